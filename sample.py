"""
Generate text from a train_slm.py checkpoint (model and tokenizer are rebuilt from it; weights_only load).

    python sample.py --out_dir=out/slm_p1 --start="def " --num_samples=3 --max_new_tokens=500
    python sample.py --ckpt=out/slm_p1/last.pt --start=FILE:prompt.txt --temperature=0.8 --top_k=20
"""
import os
import sys

import torch

from common import UserError, configure, load_checkpoint, pick_device
from data import UNK, CharTokenizer
from model import CharTransformer, TransformerConfig

out_dir = 'out/slm'  # run directory to sample from: its best.pt, else its last.pt
ckpt = ''  # an explicit checkpoint path; overrides out_dir
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 1  # independent samples, generated as one batch, in [1, inf)
max_new_tokens = 500  # characters generated per sample, in [0, inf)
temperature = 1.0  # < 1 sharper, > 1 more random, in (0, inf)
top_k = 0  # keep only the k most likely characters at each step; 0 = off; [0, inf)
seed = 1337  # the same seed and prompt give the same samples
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
config = configure(globals())
# -----------------------------------------------------------------------------

device = pick_device(device)
if not ckpt:
    ckpt = next((os.path.join(out_dir, f) for f in ('best.pt', 'last.pt') if os.path.exists(os.path.join(out_dir, f))),
                os.path.join(out_dir, 'best.pt'))
checkpoint = load_checkpoint(ckpt, required=('model_state_dict', 'model_args', 'tokenizer'))
tokenizer = CharTokenizer.from_dict(checkpoint['tokenizer'])
model = CharTransformer(TransformerConfig(**checkpoint['model_args']))
model.load_state_dict(checkpoint['model_state_dict'])
model.eval().to(device)

if start.startswith('FILE:'):
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    with open(path, encoding='utf-8') as f:
        start = f.read()
ids = tokenizer.encode(start)
if not ids:
    raise UserError("the prompt is empty; give at least one character with --start")
if UNK in ids:  # nanoGPT's char sampler raises KeyError here; we map and say so
    print(f"warning: {ids.count(UNK)} prompt character(s) outside the ASCII policy were mapped to <UNK>",
          file=sys.stderr)

generator = torch.Generator(device=device).manual_seed(seed)
prompt = torch.tensor([ids] * num_samples, device=device)
out = model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=generator)
for row in out.tolist():
    print(tokenizer.decode(row))
    print('---------------')
