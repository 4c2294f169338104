"""train_slm.py and sample.py run as a user runs them: subprocess smoke runs, resume equivalence, SIGTERM,
torchrun, and every bad-input path (clear message, exit code 2, nothing lost)."""
import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, TINY_SLM, python_like_text, run_script, sigterm_when_logged

from data import get_batch
from model import CharTransformer, TransformerConfig


def train(cwd, corpus, *args, check=True):
    return run_script('train_slm.py', *TINY_SLM, f'--dataset={corpus}', *args, cwd=cwd, check=check)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def events(run_dir):
    return [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]


def weights(path):
    return torch.load(path, weights_only=True)['model_state_dict']


def logged_losses(run_dir):
    """{iter: loss} from the 'iter N | loss X | ...' lines of log.txt."""
    return {int(m[1]): m[2] for m in re.finditer(r'^iter (\d+)/\d+ \| loss (\S+)', (run_dir / 'log.txt').read_text(),
                                                 re.M)}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus):
    """A finished 6-iteration tiny run (evals at 0, 3, 6); tests that change it work on a copy."""
    work = tmp_path_factory.mktemp('slm')
    train(work, corpus, '--max_iters=6', '--eval_interval=3', '--out_dir=out/run')
    return work / 'out' / 'run'


def test_run_directory_holds_the_facts(trained):
    names = {p.name for p in trained.iterdir()}
    assert {'config.json', 'log.txt', 'events.jsonl', 'scalars.csv', 'model.txt', 'samples.txt', 'last.pt',
            'best.pt'} <= names
    facts = json.loads((trained / 'config.json').read_text())
    for key in ('run_id', 'config_hash', 'git_commit', 'git_dirty', 'hooks', 'argv', 'python', 'torch', 'device',
                'world_size', 'start_time', 'config'):
        assert key in facts
    assert facts['config']['n_layer'] == 1 and facts['world_size'] == 1
    rows = (trained / 'scalars.csv').read_text().splitlines()
    assert rows[0] == 'iter,time_s,lr,train/loss,val/loss'
    assert [int(r.split(',')[0]) for r in rows[1:]] == [0, 3, 6]
    evs = events(trained)
    assert all(e['schema_version'] == 1 for e in evs)
    assert [e['event'] for e in evs if e['event'] != 'sample'] == ['start', 'eval', 'eval', 'eval', 'end']
    val = [e['val/loss'] for e in evs if e['event'] == 'eval']
    assert val[-1] < val[0] and evs[-1]['val/loss'] == val[-1]
    ckpt = torch.load(trained / 'last.pt', weights_only=True)
    assert ckpt['iter_num'] == 6 and ckpt['config_hash'] == facts['config_hash']
    assert 'module.' not in ''.join(ckpt['model_state_dict']) and '_orig_mod' not in ''.join(ckpt['model_state_dict'])
    log = (trained / 'log.txt').read_text()
    assert re.search(r'^iter 6/6 \| loss \d+\.\d{4} \| lr 3\.0e-04 \| \d+\.\d ms/step \| mfu \d+\.\d% \| '
                     r'elapsed \d+\.\ds \| eta 0\.0s$', log, re.M)
    assert re.search(r'^eval 0/6 \| train/loss - \| val/loss \d+\.\d{4}$', log, re.M)  # no training yet: '-', not nan
    assert re.search(r'^mfu: against [\d,.]+ GFLOP/s, the best of 20 fp32 \(128x32\)@\(32x64\) matmuls on cpu', log, re.M)
    assert log.splitlines()[0] == f"run out/run | new | config_hash {facts['config_hash'][:12]}"
    assert re.search(r'^done at iter 6/6 \| best val/loss \d+\.\d{4} \| took \S+ \| out/run: best.pt last.pt$', log, re.M)
    assert (trained / 'samples.txt').read_text().count('--- iter') == 3


def test_sample_script(trained):
    out = run_script('sample.py', f'--out_dir={trained}', '--start=def ', '--num_samples=3', '--max_new_tokens=20',
                     '--device=cpu', cwd=trained).stdout
    samples = out.split('---------------\n')[:-1]
    assert len(samples) == 3 and all(s.startswith('def ') and len(s) == 4 + 20 + 1 for s in samples)
    again = run_script('sample.py', f'--ckpt={trained / "last.pt"}', '--start=caf\u00e9', '--max_new_tokens=5',
                       '--top_k=3', '--temperature=0.5', '--device=cpu', cwd=trained)
    assert 'mapped to <UNK>' in again.stderr  # nanoGPT raises KeyError on such a prompt


def test_resume_equals_uninterrupted(tmp_path, corpus):
    train(tmp_path, corpus, '--max_iters=8', '--eval_interval=4', '--out_dir=out/a')
    train(tmp_path, corpus, '--max_iters=4', '--eval_interval=4', '--out_dir=out/b')
    train(tmp_path, corpus, '--max_iters=8', '--eval_interval=4', '--out_dir=out/b', '--init_from=resume')
    a, b = tmp_path / 'out' / 'a', tmp_path / 'out' / 'b'
    assert logged_losses(a) == logged_losses(b) and len(logged_losses(b)) == 8
    wa, wb = weights(a / 'last.pt'), weights(b / 'last.pt')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / 'scalars.csv').read_text().splitlines()[-1].split(',')[3:] == \
        (b / 'scalars.csv').read_text().splitlines()[-1].split(',')[3:]


def test_sigterm_saves_and_auto_resume_continues_exactly(tmp_path, corpus):
    code, stdout, stderr = sigterm_when_logged('train_slm.py', *TINY_SLM, f'--dataset={corpus}',
                                               '--eval_interval=100000', '--max_iters=100000', cwd=tmp_path,
                                               out_dir='out/s', text='iter 5/')
    assert code == 0 and 'stopped (signal) at iter' in stdout, stderr
    stopped_at = torch.load(tmp_path / 'out' / 's' / 'last.pt', weights_only=True)['iter_num']
    assert stopped_at >= 5 and events(tmp_path / 'out' / 's')[-1]['reason'] == 'signal'
    total = stopped_at + 3
    train(tmp_path, corpus, '--out_dir=out/s', '--eval_interval=100000', f'--max_iters={total}', '--init_from=auto')
    train(tmp_path, corpus, '--out_dir=out/u', '--eval_interval=100000', f'--max_iters={total}')
    resumed, uninterrupted = weights(tmp_path / 'out' / 's' / 'last.pt'), weights(tmp_path / 'out' / 'u' / 'last.pt')
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    start = [e for e in events(tmp_path / 'out' / 's') if e['event'] == 'start']
    assert len(start) == 2 and start[1]['iter'] == stopped_at


def test_torchrun_two_processes(tmp_path, corpus):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'train_slm.py'), *TINY_SLM, f'--dataset={corpus}', '--max_iters=4', '--eval_interval=2',
           '--out_dir=out/ddp']
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / 'out' / 'ddp'
    assert json.loads((run_dir / 'config.json').read_text())['world_size'] == 2
    ckpt = torch.load(run_dir / 'last.pt', weights_only=True)
    assert ckpt['iter_num'] == 4 and len(ckpt['rng_state']) == 2  # one RNG state per rank
    assert not torch.equal(ckpt['rng_state'][0]['torch'], ckpt['rng_state'][1]['torch'])
    assert [e['event'] for e in events(run_dir)].count('eval') == 3  # rank 0 alone writes the facts


def test_batches_do_not_grow_resident_memory(tmp_path):
    path = tmp_path / 'tokens.bin'
    np.random.default_rng(0).integers(0, 99, 64_000_000, dtype=np.uint8).tofile(path)
    starts = np.random.default_rng(1).integers(0, 64_000_000 - 300, (3000, 16))

    def rss_mb():
        return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
    get_batch(str(path), starts[0], 256)
    before = rss_mb()
    for s in starts:  # 48,000 random windows touch most pages of the 64 MB file
        get_batch(str(path), s, 256)
    assert rss_mb() - before < 16  # a long-lived memmap would keep ~64 MB of touched pages resident


# -----------------------------------------------------------------------------
# bad input: one clear line on stderr, exit code 2, no traceback, nothing overwritten
# -----------------------------------------------------------------------------

def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_help_lists_every_key_with_its_comment(tmp_path):
    out = run_script('train_slm.py', '--help', cwd=tmp_path).stdout
    assert re.search(r"--learning_rate=0\.0003\s+# peak learning rate", out)
    assert re.search(r"--dataset=''\s+# path to a UTF-8 text file", out)
    for key in ('out_dir', 'init_from', 'overwrite', 'stride', 'gradient_accumulation_steps', 'd_ff', 'warmup_iters',
                'grad_clip', 'eval_iters', 'hooks', 'compile', 'dtype'):
        assert f'--{key}=' in out


def test_unknown_key_and_wrong_type_and_missing_config(tmp_path, corpus):
    assert_clean_error(train(tmp_path, corpus, '--batch_szie=8', check=False),
                       "unknown config key 'batch_szie'", "did you mean 'batch_size'")
    assert_clean_error(train(tmp_path, corpus, '--max_iters=1.5', check=False), 'max_iters=1.5', 'expected int')
    (tmp_path / 'typo.py').write_text("learning_rat = 1e-3\n")
    assert_clean_error(run_script('train_slm.py', 'typo.py', cwd=tmp_path, check=False),
                       "typo.py: unknown config key 'learning_rat'", "did you mean 'learning_rate'")
    assert_clean_error(run_script('train_slm.py', 'nope.py', cwd=tmp_path, check=False),
                       'config file not found: nope.py')
    assert_clean_error(train(tmp_path, corpus, "--hooks=['grad_nois']", check=False),
                       "unknown hook 'grad_nois'", 'grad_noise')
    assert not (tmp_path / 'out').exists()  # nothing was started


def test_bad_datasets(tmp_path):
    (tmp_path / 'short.txt').write_text('x = 1\n' * 10)
    (tmp_path / 'latin1.txt').write_bytes('caf\u00e9 = 1\n'.encode('latin-1') * 100)
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'folder').mkdir()
    cases = {'short.txt': 'fewer than one window', 'latin1.txt': 'is not UTF-8 text', 'empty.txt': 'is empty',
             'folder': 'is a directory', 'missing.txt': 'no such file'}
    for name, message in cases.items():
        proc = run_script('train_slm.py', *TINY_SLM, f'--dataset={tmp_path / name}', cwd=tmp_path, check=False)
        assert_clean_error(proc, name, message)


def test_scratch_over_a_run_is_refused_and_resume_conflicts_are_errors(trained, corpus):
    before = {name: digest(trained / name) for name in ('last.pt', 'best.pt', 'events.jsonl', 'scalars.csv')}
    out_dir = f'--out_dir={trained}'
    assert_clean_error(train(trained, corpus, out_dir, check=False), 'already holds', '--overwrite=True')
    assert_clean_error(train(trained, corpus, out_dir, '--init_from=resume', '--n_layer=2', check=False),
                       "n_layer=2 (the checkpoint's: 1)", 'a run keeps its architecture')
    assert_clean_error(train(trained, corpus, f'--out_dir={trained}_none', '--init_from=resume', check=False),
                       "init_from='resume' but", 'does not exist')
    assert before == {name: digest(trained / name) for name in before}


def test_corrupt_checkpoint_is_a_clear_error(trained, corpus, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(trained, run_dir)
    data = (run_dir / 'last.pt').read_bytes()
    (run_dir / 'last.pt').write_bytes(data[:len(data) // 2])
    assert_clean_error(train(tmp_path, corpus, f'--out_dir={run_dir}', '--init_from=resume', check=False),
                       'last.pt is not a readable checkpoint')
    assert_clean_error(run_script('sample.py', f'--ckpt={run_dir / "last.pt"}', cwd=tmp_path, check=False),
                       'last.pt is not a readable checkpoint')
    assert (run_dir / 'last.pt').read_bytes() == data[:len(data) // 2]  # left for the user to inspect


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, corpus, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(trained, run_dir)
    kept = digest(run_dir / 'last.pt')
    # lr 1e308 sends the weights to inf in one step, so the next loss is nan
    proc = train(tmp_path, corpus, f'--out_dir={run_dir}', '--init_from=resume', '--learning_rate=1e308',
                 '--max_iters=20', '--eval_interval=100', check=False)
    assert proc.returncode == 1 and 'training loss is nan' in proc.stderr, proc.stderr
    assert events(run_dir)[-1]['event'] == 'error'
    assert digest(run_dir / 'last.pt') == kept


def test_non_ascii_is_mapped_to_unk_and_counted(trained):
    facts = json.loads((trained / 'config.json').read_text())
    assert facts['data']['unk_count'] == python_like_text(600).count('\u00e9') == 1


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, corpus):
    """batch 8 in one step == batch 4 x 2 accumulated micro-steps (the same 8 windows; dropout off)."""
    common = ['--max_iters=2', '--eval_interval=100', '--dropout=0.0']
    train(tmp_path, corpus, *common, '--batch_size=8', '--out_dir=out/big')
    train(tmp_path, corpus, *common, '--batch_size=4', '--gradient_accumulation_steps=2', '--out_dir=out/acc')
    train(tmp_path, corpus, '--max_iters=0', '--out_dir=out/init')
    big, acc = weights(tmp_path / 'out' / 'big' / 'last.pt'), weights(tmp_path / 'out' / 'acc' / 'last.pt')
    assert all(torch.allclose(big[k], acc[k], atol=1e-5) for k in big)
    torch.manual_seed(1337)  # the script's seed: the same initial weights
    init = CharTransformer(TransformerConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, d_ff=64)).state_dict()
    assert all(torch.equal(init[k], weights(tmp_path / 'out' / 'init' / 'last.pt')[k]) for k in init)
    assert not any(torch.allclose(big[k], init[k]) for k in big if k.endswith('mlp_fc.weight'))  # steps moved it


def test_stride_defaults_to_block_size(trained):
    """TINY_SLM sets block_size=32 and no stride: windows start every 32 characters (the issue's default)."""
    text_chars = json.loads((trained / 'config.json').read_text())['data']['chars']
    n_train = int(text_chars * 0.95)
    expected = len(range(0, n_train - 32, 32))
    assert f'| {expected:,} train windows |' in (trained / 'log.txt').read_text()


def test_deterministic_true_changes_nothing_on_cpu(trained, tmp_path, corpus):
    """deterministic=True turns on torch's deterministic algorithms (and TF32 off, on GPUs): the CPU kernels are
    deterministic already, so the same run gives the same weights, and the same config_hash (a 'how' key)."""
    train(tmp_path, corpus, '--max_iters=6', '--eval_interval=3', '--deterministic=True', '--out_dir=out/det')
    a, b = weights(trained / 'last.pt'), weights(tmp_path / 'out' / 'det' / 'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    facts = [json.loads((d / 'config.json').read_text()) for d in (trained, tmp_path / 'out' / 'det')]
    assert facts[1]['config']['deterministic'] is True and facts[0]['config_hash'] == facts[1]['config_hash']
