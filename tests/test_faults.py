"""Run directories under faults: one writer, refusals that change nothing, overwrite that keeps the old run, facts
cut back to the checkpoint on resume (SIGKILL at random moments), stale temporary files, full and read-only disks."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT, SCRIPT_ENV, TINY_SLM, run_script


def snapshot(folder):
    """{relative path: bytes} of every file under folder (the lock file aside: it lives only while a run does)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file() and p.name != common.LOCK_FILE}


def slm(cwd, corpus, out_dir, *args, check=True):
    return run_script('train_slm.py', f'--dataset={corpus}', *TINY_SLM, '--eval_interval=5', f'--out_dir={out_dir}',
                      *args, cwd=cwd, check=check)


def refused(proc, *fragments):
    """One `error:` line, exit code 2, no traceback, naming every fragment."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def finished(tmp_path_factory, corpus):
    """A finished 20-iteration run and a 10-iteration one, to aim mistakes at (copied per test)."""
    root = tmp_path_factory.mktemp('finished')
    slm(root, corpus, 'out/x20', '--max_iters=20')
    slm(root, corpus, 'out/base', '--max_iters=10')
    return root


@pytest.fixture
def runs(finished, tmp_path):
    subprocess.run(['cp', '-r', str(finished / 'out'), str(tmp_path)], check=True)
    return tmp_path


def test_starting_from_another_checkpoint_into_a_finished_run_needs_overwrite(runs, corpus):
    before = snapshot(runs / 'out')
    proc = slm(runs, corpus, 'out/x20', '--init_from=out/base/last.pt', '--max_iters=20', check=False)
    refused(proc, 'out/x20 already holds last.pt, best.pt', 'out/base/last.pt', '--overwrite=True')
    assert snapshot(runs / 'out') == before


def test_overwrite_moves_the_old_run_aside_only_after_every_check(runs, corpus):
    before = snapshot(runs / 'out/x20')
    refused(slm(runs, corpus, 'out/x20', '--overwrite=True', '--n_head=3', check=False), 'n_head=3')
    refused(slm(runs, corpus, 'out/x20', '--overwrite=True', '--dataset=missing.txt', check=False), 'missing.txt')
    assert snapshot(runs / 'out/x20') == before and sorted(os.listdir(runs / 'out')) == ['base', 'x20']
    proc = slm(runs, corpus, 'out/x20', '--overwrite=True', '--max_iters=5')
    aside = [d for d in os.listdir(runs / 'out') if d.startswith('x20.replaced-')]
    assert len(aside) == 1 and "moved to out/x20.replaced-" in proc.stdout
    assert snapshot(runs / 'out' / aside[0]) == before  # every old file, byte for byte
    assert [e['event'] for e in map(json.loads, (runs / 'out/x20/events.jsonl').read_text().splitlines())][0] == 'start'
    assert torch.load(runs / 'out/x20/last.pt', weights_only=True)['iter_num'] == 5


def test_a_second_writer_is_refused_and_changes_nothing(runs, corpus):
    first = subprocess.Popen([sys.executable, str(ROOT / 'train_slm.py'), f'--dataset={corpus}', *TINY_SLM,
                              '--eval_interval=50', '--max_iters=100000', '--out_dir=out/busy'], cwd=runs,
                             env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = runs / 'out/busy/log.txt', time.time() + 60
    while not (log.exists() and 'iter 60/' in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    try:
        for init in ('scratch', 'auto', 'resume'):
            proc = slm(runs, corpus, 'out/busy', f'--init_from={init}', '--overwrite=True', check=False)
            refused(proc, 'out/busy is being written by pid', f'pid {first.pid} on ')
        assert common.lock_holder(str(runs / 'out/busy')).startswith(f'pid {first.pid} on ')
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130 and common.lock_holder(str(runs / 'out/busy')) is None
    assert not (runs / 'out/busy' / common.LOCK_FILE).exists()
    events = [json.loads(line) for line in (runs / 'out/busy/events.jsonl').read_text().splitlines()]
    assert [e['event'] for e in events if e['event'] in ('start', 'end')] == ['start', 'end']
    iters = [int(r['iter']) for r in csv.DictReader(open(runs / 'out/busy/scalars.csv'))]
    assert iters == sorted(set(iters))  # one writer: no row twice


def test_the_lock_is_an_os_lock_that_dies_with_its_process(tmp_path):
    out = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', f"import common, time; common.lock_run_dir({str(out)!r}); "
                               f"print('held', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == 'held\n'
    assert common.lock_holder(str(out)).startswith(f'pid {holder.pid} on ')
    with pytest.raises(common.UserError, match=f'is being written by pid {holder.pid}'):
        common.lock_run_dir(str(out))
    holder.kill()  # SIGKILL: no atexit, the lock file stays behind, but the OS lock is gone with the process
    holder.wait()
    assert (out / common.LOCK_FILE).exists() and common.lock_holder(str(out)) is None
    common.lock_run_dir(str(out))  # a killed holder never blocks the next run
    assert common.lock_holder(str(out)).startswith(f'pid {os.getpid()} on ')


def test_a_refused_start_leaves_no_folder_behind(tmp_path, corpus):
    refused(slm(tmp_path, corpus, 'out/new/run', '--n_head=3', check=False), 'n_head=3')
    assert not (tmp_path / 'out').exists()


def test_out_dir_that_is_a_file(tmp_path, corpus):
    (tmp_path / 'taken').write_text('mine')
    refused(slm(tmp_path, corpus, 'taken', check=False), "out_dir='taken' is a file", 'expected a run directory')
    assert (tmp_path / 'taken').read_text() == 'mine'


def uninterrupted(cwd, corpus, out_dir, iters):
    slm(cwd, corpus, out_dir, f'--max_iters={iters}')
    return facts(cwd / out_dir)


def facts(run_dir):
    """What must match row for row: scalars without the wall-clock column, evals and samples, the samples file."""
    rows = [{k: v for k, v in r.items() if k != 'time_s'} for r in csv.DictReader(open(run_dir / 'scalars.csv'))]
    events = [{k: v for k, v in e.items() if k not in ('time_s', 'run_id')} for e in
              map(json.loads, (run_dir / 'events.jsonl').read_text().splitlines()) if e['event'] in ('eval', 'sample')]
    return rows, events, (run_dir / 'samples.txt').read_text()


def test_sigkill_at_random_moments_then_resume_leaves_the_facts_of_an_uninterrupted_run(tmp_path, corpus):
    expected = uninterrupted(tmp_path, corpus, 'out/whole', 40)
    rng, kills, out = random.Random(0), 0, tmp_path / 'out/killed'
    # the worst moment first: an eval's row and events are written, its checkpoint is not (yet)
    for text in ['eval 10/40', 'eval 20/40', None, None]:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'train_slm.py'), f'--dataset={corpus}', *TINY_SLM,
                                 '--eval_interval=5', '--max_iters=40', '--init_from=auto', '--out_dir=out/killed'],
                                cwd=tmp_path, env=SCRIPT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if text:
            while proc.poll() is None and not ((out / 'log.txt').exists() and text in (out / 'log.txt').read_text()):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(1.5, 3.0))  # start-up takes ~1.5 s: anywhere from there on
        kills += proc.poll() is None
        proc.kill()
        proc.wait()
    assert kills >= 2
    slm(tmp_path, corpus, 'out/killed', '--max_iters=40', '--init_from=auto')
    assert facts(out) == expected
    assert not [n for n in os.listdir(out) if '.tmp' in n]


def test_a_resume_refuses_facts_edited_since_the_checkpoint(runs, corpus):
    scalars = runs / 'out/x20/scalars.csv'
    scalars.write_text(scalars.read_text().replace('val/loss', 'val_loss', 1))
    before = snapshot(runs / 'out')
    proc = slm(runs, corpus, 'out/x20', '--init_from=resume', '--max_iters=30', check=False)
    refused(proc, 'out/x20/scalars.csv is not what out/x20/last.pt recorded', 'edited or cut')
    assert snapshot(runs / 'out') == before


def test_resume_removes_stale_temporary_files_and_keeps_a_stops_end_event(runs, corpus):
    stale = runs / 'out/x20/last.pt.tmp99999'
    stale.write_bytes(b'x' * 1000)
    proc = slm(runs, corpus, 'out/x20', '--init_from=resume', '--max_iters=25')
    assert not stale.exists() and 'removed 1 temporary file(s) of an unfinished save: out/x20/last.pt.tmp99999' \
        in proc.stdout
    events = [json.loads(line) for line in (runs / 'out/x20/events.jsonl').read_text().splitlines()]
    assert [(e['event'], e.get('reason')) for e in events if e['event'] in ('start', 'end')] == \
        [('start', None), ('end', 'done'), ('start', None), ('end', 'done')]


@pytest.mark.parametrize('make, message', [
    (lambda p: p.write_bytes(b''), 'is not a readable checkpoint of this project (EOFError: the file is empty)'),
    (lambda p: torch.save(dict(model_state_dict={}, model_args={}, args={'arch': 'crnn', 'n_mels': 64},
                               script='train_audio.py'), p),
     'was written by train_audio.py, not train_slm.py: its config has keys train_slm.py does not know: arch, n_mels'),
])
def test_a_checkpoint_that_is_not_this_scripts_is_one_line(runs, corpus, make, message):
    make(runs / 'out/x20/last.pt')
    before = snapshot(runs / 'out')
    refused(slm(runs, corpus, 'out/x20', '--init_from=resume', check=False), 'out/x20/last.pt', message)
    assert snapshot(runs / 'out') == before


@pytest.mark.parametrize('text, message', [
    ('batch_size = (\n', 'line 1: '),
    ('batch_size = 4\nx = 1 / 0\n', 'line 2: ZeroDivisionError: division by zero'),
    ('import no_such_module\n', "line 1: ModuleNotFoundError: No module named 'no_such_module'"),
    (b'# caf\xe9\n', 'not UTF-8 text'),
    (None, 'is a directory: conf.py (expected a path to a .py file'),
])
def test_a_config_file_that_fails_is_one_line(tmp_path, corpus, text, message):
    path = tmp_path / 'conf.py'
    path.mkdir() if text is None else path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(slm(tmp_path, corpus, 'out/x', 'conf.py', check=False), 'config file ', 'conf.py', message)
    assert sorted(os.listdir(tmp_path)) == ['conf.py']


def test_an_all_unknown_text_warns(tmp_path):
    (tmp_path / 'ru.txt').write_text('привет мир ' * 2000)
    proc = run_script('train_slm.py', '--dataset=ru.txt', *TINY_SLM, '--max_iters=0', '--out_dir=out/ru',
                      cwd=tmp_path)
    assert 'warning: 82% of' in proc.stdout and 'maps to <UNK>' in proc.stdout


def mounted(tmp_path, *options):
    """A tmpfs (or a read-only bind) of our own, where the OS lets this user mount one; else the test is skipped."""
    target = tmp_path / 'mnt'
    target.mkdir(exist_ok=True)
    command = ['mount', *options, str(target)]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip(f"cannot {' '.join(command)} here (needs root)")
    return target


def unmount(target):
    subprocess.run(['umount', str(target)], check=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, corpus):
    disk = mounted(tmp_path, '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs')
    try:
        slm(disk, corpus, 'out/run', '--max_iters=5')
        before = snapshot(disk / 'out')
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / 'filler').write_bytes(b'\0' * (free - 64 * 1024))  # room for facts, none for a checkpoint
        proc = slm(disk, corpus, 'out/run', '--init_from=resume', '--max_iters=10', check=False)
        refused(proc, 'out/run/last.pt: No space left on device', 'the last checkpoint is kept as it was')
        after = snapshot(disk / 'out')
        assert after['run/last.pt'] == before['run/last.pt'] and after['run/best.pt'] == before['run/best.pt']
        assert not [n for n in os.listdir(disk / 'out/run') if '.tmp' in n]
        last = json.loads((disk / 'out/run/events.jsonl').read_text().splitlines()[-1])
        assert last['event'] == 'error' and 'No space left on device' in last['message']
        (disk / 'filler').unlink()  # room again: the run continues from the checkpoint it kept
        slm(disk, corpus, 'out/run', '--init_from=resume', '--max_iters=10')
        assert torch.load(disk / 'out/run/last.pt', weights_only=True)['iter_num'] == 10
    finally:
        unmount(disk)


def test_a_read_only_disk_is_one_line_and_changes_nothing(runs, corpus, tmp_path):
    disk = mounted(tmp_path, '--bind', '-o', 'ro', str(runs / 'out'))
    try:
        before = snapshot(disk)
        for out_dir, init in (('x20', 'resume'), ('fresh', 'scratch')):
            proc = slm(tmp_path, corpus, f'mnt/{out_dir}', f'--init_from={init}', '--max_iters=30', check=False)
            refused(proc, f'out_dir mnt/{out_dir}: cannot write a run directory there (Read-only file system)')
        assert snapshot(disk) == before
    finally:
        unmount(disk)


def epoch_facts(run_dir):
    """facts() of an epoch script: its rows and evals without the columns that time the run."""
    timing = ('time_s', 'run_id', 'samples_per_s', 'data_share')
    rows = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(run_dir / 'scalars.csv'))]
    events = [{k: v for k, v in e.items() if k not in timing} for e in
              map(json.loads, (run_dir / 'events.jsonl').read_text().splitlines()) if e['event'] == 'eval']
    return rows, events


@pytest.mark.parametrize('script', ['train_spoter.py', 'train_vae.py'])
def test_sigkill_during_epochs_then_resume_leaves_the_facts_of_an_uninterrupted_run(tmp_path, script):
    from data import write_sign_csvs
    if script == 'train_spoter.py':
        csvs = write_sign_csvs(str(tmp_path / 'signs'), num_classes=4, clips_per_class=(8, 3, 3), seed=0)
        args = ['--batch_size=4', *(f'--{k}_csv={p}' for k, p in zip(('train', 'val', 'test'), csvs))]
    else:
        args = ['--batch_size=32', '--dataset_kind=grids', '--num_images=600', f"--cache_dir={tmp_path / 'cache'}"]
    args += ['--device=cpu', '--max_epochs=3', '--log_interval=1']
    run_script(script, *args, '--out_dir=out/whole', cwd=tmp_path)
    rng, kills, out = random.Random(1), 0, tmp_path / 'out/killed'
    for text in ['epoch 1/3 | step', 'epoch 2/3 | step']:
        proc = subprocess.Popen([sys.executable, str(ROOT / script), *args, '--init_from=auto', '--out_dir=out/killed'],
                                cwd=tmp_path, env=SCRIPT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not ((out / 'log.txt').exists() and text in (out / 'log.txt').read_text()):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.3))
        kills += proc.poll() is None
        proc.kill()
        proc.wait()
    assert kills >= 1
    run_script(script, *args, '--init_from=auto', '--out_dir=out/killed', cwd=tmp_path)
    assert epoch_facts(out) == epoch_facts(tmp_path / 'out/whole')
