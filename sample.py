"""
Generate text from a train_slm.py checkpoint (model and tokenizer are rebuilt from it; weights_only load).

    python sample.py --out_dir=out/slm_p1 --start="def " --num_samples=3 --max_new_tokens=500
    python sample.py --ckpt=out/slm_p1/last.pt --start=FILE:prompt.txt --temperature=0.8 --top_k=20
    python sample.py --out_dir=out/slm_p1 --temperature=0    # greedy: the most likely character at every step
"""
import glob
import os
import sys

import torch

from common import UserError, configure, declared_keys, load_checkpoint, pick_device
from data import UNK, CharTokenizer
from model import CharTransformer, TransformerConfig

out_dir = 'out/slm'  # run directory to sample from: its best.pt, else its last.pt
ckpt = ''  # an explicit checkpoint path; overrides out_dir
start = '\n'  # the prompt (at least one character), or FILE:path to read it from a UTF-8 text file
num_samples = 1  # independent samples, generated as one batch, in [1, inf)
max_new_tokens = 500  # characters generated per sample (0: the prompt alone), in [0, inf)
temperature = 1.0  # < 1 sharper, > 1 more random, 0 = greedy (the argmax at every step, whatever the seed); [0, inf)
top_k = 0  # keep only the k most likely characters at each step; 0 = off; [0, inf)
seed = 1337  # the same seed and prompt give the same samples (torch takes seeds below 2**64); [0, 1e19]
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
config = configure(globals())
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))

# the prompt first: a bad one is refused before the checkpoint is loaded
if start.startswith('FILE:'):
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r}: " + ("a folder" if os.path.isdir(path) else "not found")
                        + "; expected --start=FILE:path/to/prompt.txt (a UTF-8 text file)")
    try:
        with open(path, encoding='utf-8') as f:
            start = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
if not start:
    raise UserError("the prompt is empty; give at least one character with --start (or a non-empty FILE:path)")

device = pick_device(device)
if not ckpt:
    if not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir!r}: no such folder; expected a train_slm.py run directory (or --ckpt=path)")
    ckpt = next((os.path.join(out_dir, f) for f in ('best.pt', 'last.pt') if os.path.exists(os.path.join(out_dir, f))),
                None)
    if ckpt is None:
        raise UserError(f"out_dir={out_dir!r} holds no best.pt or last.pt; expected a train_slm.py run directory")
elif os.path.isdir(ckpt):
    raise UserError(f"ckpt={ckpt!r} is a folder; expected a checkpoint file (for a run directory: --out_dir={ckpt})")
checkpoint = load_checkpoint(ckpt, required=('model_state_dict', 'model_args'))
if 'tokenizer' not in checkpoint:  # every other train_*.py checkpoint: say which, not a KeyError
    writer = checkpoint.get('script')
    if not writer:  # saved before checkpoints named their script: the train_*.py here whose keys match its config
        keys = set(checkpoint.get('args') or {})
        scripts = {os.path.basename(p): set(declared_keys(p)) for p in glob.glob(os.path.join(HERE, 'train_*.py'))}
        best = max(scripts, key=lambda s: len(keys & scripts[s]) / len(keys | scripts[s]), default=None)
        writer = f"{best} (judged by its config keys)" if keys and best else 'another script'
    raise UserError(f"{ckpt} was written by {writer}, not train_slm.py: sample.py generates text from train_slm.py "
                    f"checkpoints (they hold the tokenizer)")
try:
    tokenizer = CharTokenizer.from_dict(checkpoint['tokenizer'])
    model = CharTransformer(TransformerConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model_state_dict'])
except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a tokenizer or weights this model.py cannot rebuild
    reason = str(e).strip().splitlines()[0][:200]
    raise UserError(f"{ckpt}: a train_slm.py checkpoint this model.py cannot rebuild ({type(e).__name__}: "
                    f"{reason})") from None
model.eval().to(device)

ids = tokenizer.encode(start)
if UNK in ids:  # nanoGPT's char sampler raises KeyError here; we map and say so
    print(f"warning: {ids.count(UNK)} prompt character(s) outside the ASCII policy were mapped to <UNK>",
          file=sys.stderr)

generator = torch.Generator(device=device).manual_seed(seed)
prompt = torch.tensor([ids] * num_samples, device=device)
# temperature 0: top_k=1 leaves one finite logit, so the draw is its argmax whatever the seed (model.generate divides
# by the temperature, so it is given 1); exact ties between float logits would be drawn among
greedy = temperature == 0
out = model.generate(prompt, max_new_tokens, temperature=1.0 if greedy else temperature,
                     top_k=1 if greedy else top_k or None, generator=generator)
for row in out.tolist():
    print(tokenizer.decode(row))
    print('---------------')
