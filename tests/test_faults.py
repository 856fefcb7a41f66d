"""Faults a real week brings to training (issue 19): Ctrl-C, a bad sample, a full disk, a finished
run, a typo, a copied run folder, a garbage checkpoint, an error under torchrun."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from test_train import ROOT, TINY, assert_same_state, newest, no_loss_plots, run, run_folder

import cluster
import data
import runs
import train
from cluster import UserError

assert no_loss_plots  # the autouse fixture of test_train, here too


# ----------------------------------------------------------------------------------------------
# Ctrl-C: a stop request like SIGTERM (checkpoint, exit 130, resume bitwise); twice quits at once

CTRL_C = ["--align", "sara", "--disc-every", "2", "--max-steps", "12", "--log-every", "100",
          "--num-workers", "1"]


def train_process(out, *flags):
    """python train.py with the tiny flags in its own session (a terminal's process group)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *flags,
                             "--out", str(out)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_step_and_resumes_exactly(tmp_path):
    run_dir = run_folder(tmp_path / "a", *CTRL_C)
    process = train_process(tmp_path / "a", *CTRL_C)
    while not os.path.exists(os.path.join(run_dir, "checkpoints", "0000002.pt")):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal does: the loader's worker too
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    stopped = newest(run_dir)["step"]
    assert 2 <= stopped < 12 and "Traceback" not in output and "Error" not in output
    assert f"preempted (SIGINT): stopped after step {stopped} with a checkpoint" in output
    assert "Ctrl-C: stopping after this step" in output
    for out in (tmp_path / "a", tmp_path / "straight"):  # the same command continues; straight
        output = train_process(out, *CTRL_C).communicate(timeout=300)[0]
        assert "Traceback" not in output, output
    a, b = newest(run_folder(tmp_path / "straight", *CTRL_C)), newest(run_dir)
    assert a["step"] == b["step"] == 12
    assert_same_state(a, b)


def test_a_second_ctrl_c_a_second_later_quits_at_once(monkeypatch, capsys):
    monkeypatch.setattr(cluster.StopRequest, "stopping", False)  # restored after the test
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop = cluster.StopRequest()
    stop.handle(signal.SIGINT, None)
    clock[0] += 0.5  # torchrun forwarding the terminal's Ctrl-C: the same request
    stop.handle(signal.SIGINT, None)
    assert stop.signal == "SIGINT"
    clock[0] += 1
    with pytest.raises(SystemExit) as quit_:
        stop.handle(signal.SIGINT, None)
    assert quit_.value.code == 130 and "second Ctrl-C" in capsys.readouterr().err
    later = cluster.StopRequest()  # a Ctrl-C after a preemption signal changes nothing
    later.handle(signal.SIGTERM, None)
    clock[0] += 5
    later.handle(signal.SIGINT, None)
    assert later.signal == "SIGTERM"


def test_ctrl_c_is_a_stop_request_that_exits_130_and_workers_ignore_it(monkeypatch):
    monkeypatch.setattr(cluster.StopRequest, "stopping", False)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        with cluster.stop_signals(("TERM",)) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs in this thread, between bytecodes
            assert stop.signal == "SIGINT" and stop.agreed(1)
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    with cluster.stop_signals(("TERM",)) as stop:  # a preemption signal: exit 0 as before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert stop.signal == "SIGTERM"
    child = os.fork()
    if child == 0:  # a loader worker: Ctrl-C and the stop signals are ignored
        cluster.ignore_signals(("USR1",))
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGUSR1)
        os._exit(7)
    assert os.waitpid(child, 0)[1] >> 8 == 7


# ----------------------------------------------------------------------------------------------
# Errors and refusals: said once, naming what the user typed

def test_errors_under_torchrun_are_said_once_by_rank_0(monkeypatch):
    monkeypatch.setattr(cluster.StopRequest, "stopping", False)
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    for rank, said in [("0", "x.py: error: bad"), ("1", "x.py: error (rank 1): bad")]:
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop, cluster.main_errors("x.py"):
            raise UserError("bad")
        assert stop.value.code == said
    # rank 1 waited first: torchrun ends it once rank 0 has failed, before it repeats the line
    assert sleeps == [cluster.RANK_ERROR_DELAY]
    exits = []  # torchrun's SIGTERM during training, then the error: rank 0 says it, not rank 1
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code) or sys.exit("exited"))
    monkeypatch.setattr(cluster.StopRequest, "stopping", True)
    with pytest.raises(SystemExit, match="exited"), cluster.main_errors("x.py"):
        raise UserError("bad")
    assert exits == [0]


def torchrun(*flags):
    """(exit status, output) of train.py on 2 gloo ranks with the tiny flags."""
    from test_train import free_port

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), *TINY, *flags],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_under_torchrun_an_error_and_a_finished_run_are_said_once(prepared, tmp_path):
    code, output = torchrun("--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert code == 1 and output.count("train.py: error: data dir") == 1, output
    assert "<NO_OTHER_FAILURES>" in output  # torchrun's summary names rank 0 only
    root, png, npy = damage(prepared, tmp_path)  # the ranks agree on the bad samples too
    flags = ["--data-dir", str(root), "--align", "none", "--max-steps", "4", "--out", str(tmp_path)]
    assert torchrun(*flags)[0] == 0
    code, output = torchrun(*flags)
    assert code == 0 and output.count("is already complete at step 4: give a higher") == 1, output
    run_dir = run_folder(tmp_path, *flags[:-2])
    assert sum(r.get("bad_samples", 0) for r in runs.read_metrics(run_dir)) == 2
    listed = open(os.path.join(run_dir, data.BAD_SAMPLES)).read().splitlines()
    assert [line.split("\t")[0] for line in listed] == [png, npy]


def test_resume_refusal_names_the_flag_typed(tmp_path):
    run_dir = run(tmp_path, "--align", "repa", "--max-steps", "2", "--run-name", "r")
    with pytest.raises(SystemExit, match=r"--model: 'SiT-T/2' there, 'SiT-S/2' now, and \d more"):
        run(tmp_path, "--align", "repa", "--max-steps", "4", "--run-name", "r", "--model",
            "SiT-S/2")
    assert [runs.checkpoint_step(p) for p in runs.checkpoint_paths(run_dir)] == [2]


def test_garbage_checkpoint_is_not_a_checkpoint_without_torchs_advice(tmp_path):
    path = tmp_path / "garbage.pt"
    # not a zip's or a pickle's first bytes (random bytes start with b"\x80" once in 256)
    path.write_bytes(b"garbage" + np.random.default_rng(0).bytes(4089))
    with pytest.raises(UserError) as e:
        runs.read_checkpoint(str(path))
    assert str(e.value) == f"{path} is not a checkpoint (not a torch.save file)"
    torch.save({"args": shutil.disk_usage}, path)  # a pickled function
    with pytest.raises(UserError, match=r"of tensors \(it pickles shutil.disk_usage, which") as e:
        runs.read_checkpoint(str(path))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The run folder: a finished run says so, a failed start leaves none, a copy resumes

def test_a_finished_run_says_it_is_complete_and_how_to_go_on(tmp_path, capsys):
    run_dir = run(tmp_path, "--align", "none", "--max-steps", "4")
    for steps in ("4", "2"):  # the same command, and a lower --max-steps
        capsys.readouterr()
        run(tmp_path, "--align", "none", "--max-steps", steps)
        said = [line.split("INFO train: ")[-1] for line in capsys.readouterr().err.splitlines()
                if "already complete" in line]
        assert said == [f"the run in {run_dir} is already complete at step 4: give a higher "
                        "--max-steps to train longer, or another --run-name to start another run"]
    assert newest(run_dir)["step"] == 4


def test_failed_starts_leave_no_run_folder(tmp_path, capsys):
    for flags in (["--lr", "1e-4x"], ["--data-dir", str(tmp_path / "nowhere")],
                  ["--synthetic-images", "2"], ["--eval-every", "2", "--eval-ref", "nope.npz"]):
        with pytest.raises(SystemExit):
            run(tmp_path / "out", "--align", "none", *flags)
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_a_copied_run_folder_resumes_with_a_note(tmp_path, capsys):
    straight = run(tmp_path / "a", "--align", "none", "--max-steps", "4")
    first = run(tmp_path / "b", "--align", "none", "--max-steps", "2")
    shutil.copytree(first, tmp_path / "b" / "copy")
    capsys.readouterr()
    copy = run(tmp_path / "b", "--align", "none", "--max-steps", "4", "--run-name", "copy")
    assert f"resuming run {os.path.basename(first)!r} in folder {copy} (the folder was copied or " \
        "renamed)" in capsys.readouterr().err
    assert_same_state(newest(straight), newest(copy))


# ----------------------------------------------------------------------------------------------
# Bad samples: replaced by the next readable one, said once, counted, listed, bounded

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 16-image REPA-layout folder made by data.py (tiny random VAE, 32 px, 2 classes)."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    for i in range(16):
        folder = root / "raw" / f"n{i % 2:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    data.main(data.parse_args(["--source", str(root / "raw"), "--dest", str(root / "data"),
                               "--resolution", "32", "--vae", "tiny-random", "--workers", "0"]))
    return root / "data"


def damage(prepared, tmp_path):
    """A copy of prepared with a truncated PNG (sample 3) and a garbage latent (sample 9)."""
    copy = shutil.copytree(prepared, tmp_path / "data")
    png = copy / "images/00000/img00000003.png"
    npy = copy / "vae-sd/00000/img-mean-std-00000009.npy"
    png.write_bytes(png.read_bytes()[:200])
    npy.write_bytes(b"garbage" * 40)
    return copy, str(png), str(npy)


def test_unreadable_files_are_bad_samples_that_the_next_readable_one_replaces(prepared, tmp_path):
    root, png, npy = damage(prepared, tmp_path)
    dataset = data.LatentImageDataset(str(root))
    latent = root / "vae-sd/00000/img-mean-std-00000005.npy"
    for bad, reason in [(np.zeros((8, 4, 3), np.float32), r"shape \(8, 4, 3\), expected \(8, 4, 4"),
                        (np.zeros((8, 4, 4), np.int32), "dtype int32, expected floating"),
                        (np.full((8, 4, 4), np.nan, np.float32), "non-finite values")]:
        np.save(latent, bad)
        with pytest.raises(data.BadSample, match=reason):
            dataset[5]
    os.remove(latent)  # a vanished file
    with pytest.raises(data.BadSample, match="unreadable .FileNotFoundError"):
        dataset[5]
    stand_ins = data.StandIns(dataset)
    for i, path, reason in [(3, png, "unreadable (OSError: "), (9, npy, "not an array file")]:
        *sample, note = stand_ins[i]
        assert note.startswith(f"{path}\t{reason}")
        assert all(torch.equal(a, b) for a, b in zip(sample, dataset[i + 1]))  # the next one
    assert stand_ins[4][3] == "" and stand_ins[15][2] == dataset[15][2]


def old_getitem(self, idx):
    """LatentImageDataset.__getitem__ before bad samples were checked (issue 19)."""
    image = data.load_image(os.path.join(self.images_dir, self.image_fnames[idx]))
    moments = np.load(os.path.join(self.features_dir, self.feature_fnames[idx]))
    return (torch.from_numpy(image), torch.from_numpy(moments).float(),
            torch.tensor(self.labels[idx]))


@pytest.mark.slow
def test_clean_data_trains_bit_identically_with_and_without_the_checks(prepared, tmp_path,
                                                                      monkeypatch):
    flags = ["--data-dir", str(prepared), "--align", "repa", "--max-steps", "4"]
    checked = run(tmp_path / "checked", *flags)
    monkeypatch.setattr(data.LatentImageDataset, "__getitem__", old_getitem)
    monkeypatch.setattr(data.StandIns, "__getitem__", lambda self, i: (*self.dataset[i], ""))
    assert_same_state(newest(run(tmp_path / "plain", *flags)), newest(checked))
    assert [r["bad_samples"] for r in runs.read_metrics(checked)] == [0, 0]
    assert not os.path.exists(os.path.join(checked, data.BAD_SAMPLES))


@pytest.mark.slow
def test_bad_samples_are_said_once_counted_listed_and_resume_exactly(prepared, tmp_path):
    root, png, npy = damage(prepared, tmp_path)
    flags = ["--data-dir", str(root), "--align", "repa", "--log-every", "4", "--max-steps", "8"]
    straight = run(tmp_path / "a", *flags)  # two epochs of 4 batches: each bad file read twice
    assert [r["bad_samples"] for r in runs.read_metrics(straight)] == [2, 2]
    listed = open(os.path.join(straight, data.BAD_SAMPLES)).read().splitlines()
    assert [line.split("\t")[0] for line in listed] == [png, npy]
    assert listed[0].split("\t")[1].startswith("unreadable (OSError: image file is truncated")
    log = open(os.path.join(straight, "log.txt")).read()
    assert log.count(f"unreadable sample {png} (") == log.count(f"unreadable sample {npy} (") == 1
    run(tmp_path / "b", *flags[:-2], "--max-steps", "5")  # stopped inside the second epoch ...
    resumed = run(tmp_path / "b", *flags)  # ... and resumed
    assert_same_state(newest(straight), newest(resumed))
    assert open(os.path.join(resumed, data.BAD_SAMPLES)).read().splitlines() == listed


def test_too_many_bad_samples_or_strict_data_stop_with_the_repair(prepared, tmp_path):
    root, png, npy = damage(prepared, tmp_path)
    flags = ["--data-dir", str(root), "--align", "none", "--max-steps", "4", "--log-every", "4"]
    with pytest.raises(SystemExit, match=rf"2 unreadable samples, more than --max-bad-samples 1 "
                       rf"\({png}, {npy}; all in .*{data.BAD_SAMPLES}\): repair with python "
                       rf"data.py --verify {root}, or raise --max-bad-samples"):
        run(tmp_path, *flags, "--max-bad-samples", "1")
    with pytest.raises(SystemExit, match=r"unreadable sample .*(img00000003.png|00000009.npy) "
                       rf"\(.*\) and --strict-data 1: repair with python data.py --verify {root}"):
        run(tmp_path, *flags, "--strict-data", "1", "--run-name", "strict")


# ----------------------------------------------------------------------------------------------
# The disk: an unwritable --out before any work, a full disk at a checkpoint


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(train, "build_run", lambda *args: built.append(args))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'file'} is not a folder"):
        run(tmp_path / "file", "--align", "none")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real = os.makedirs

    def refused(path, *args, **kwargs):  # root ignores chmod: a read-only file system instead
        if str(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refused)
    with pytest.raises(SystemExit, match=f"{read_only / 'runs'} is on a read-only file system"):
        run(read_only / "runs", "--align", "none")
    assert built == []


def test_a_full_disk_at_a_metrics_row_is_one_line_and_the_torn_row_is_written_again(tmp_path,
                                                                                   monkeypatch):
    """The disk fills in the middle of step 4's metrics.jsonl append: one line, and the re-run
    drops the torn row, resumes from step 2's checkpoint and writes rows 2 and 4 as a straight
    run does; a full disk at the loss plot is the same line; a broken middle row is named."""
    run_dir = run(tmp_path, "--align", "none", "--max-steps", "2")
    real_open = open

    def torn(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(runs.METRICS) and mode == "a":
            f.write('{"step": 4, "veloc')
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(runs, "open", torn, raising=False)
    with pytest.raises(SystemExit, match=rf"the disk holding {run_dir} is full"):
        run(tmp_path, "--align", "none", "--max-steps", "4")
    monkeypatch.undo()
    resumed = run(tmp_path, "--align", "none", "--max-steps", "4")
    straight = run(tmp_path / "straight", "--align", "none", "--max-steps", "4")
    assert [r["step"] for r in runs.read_metrics(resumed)] == [2, 4]
    assert_same_state(newest(straight), newest(resumed))

    def full(*paths):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "plot_metrics", full)
    with pytest.raises(SystemExit, match=rf"the disk holding {run_dir} is full"):
        run(tmp_path, "--align", "none", "--max-steps", "6")
    with open(os.path.join(run_dir, runs.METRICS), "a") as f:
        f.write("not json\n{\"step\": 8}\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: line 4 is not a JSON row"):
        runs.read_metrics(run_dir)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path,
                                                                           monkeypatch):
    run_dir = run(tmp_path, "--align", "none", "--max-steps", "2")
    size = os.path.getsize(runs.checkpoint_paths(run_dir)[-1])
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    folder = os.path.join(run_dir, "checkpoints")
    with pytest.raises(SystemExit, match=rf"not enough space in {folder} for a checkpoint: "
                       rf".* free, {size / 1e6:.1f} MB needed"):
        run(tmp_path, "--align", "none", "--max-steps", "4")
    monkeypatch.undo()
    monkeypatch.setattr(runs, "plot_metrics", lambda *paths: None)
    real_save = torch.save

    def enospc(obj, f):
        if isinstance(obj, dict) and "model" in obj:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(SystemExit, match=rf"the disk holding {folder} is full \(.* free\)"):
        run(tmp_path, "--align", "none", "--max-steps", "4")
    assert os.listdir(folder) == ["0000002.pt"]  # intact, no temporary left
    full = []  # torch.save's own error when the disk fills during the write

    def enforce_fail(obj, f):
        full.append(f.write(b"half a checkpoint"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2907392")

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage._replace(free=17) if full else usage)
    with pytest.raises(SystemExit, match=rf"not enough space in {folder} for a checkpoint: 17 B"):
        run(tmp_path, "--align", "none", "--max-steps", "4")
    assert os.listdir(folder) == ["0000002.pt"] and newest(run_dir)["step"] == 2
    monkeypatch.undo()
    monkeypatch.setattr(runs, "plot_metrics", lambda *paths: None)
    assert newest(run(tmp_path, "--align", "none", "--max-steps", "4"))["step"] == 4
