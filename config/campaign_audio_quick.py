# The campaign of campaign_audio.py (same plan, diff-aligned) with a tiny recipe: 31 runs, one seed, minutes on a CPU:
# phase 1, the teacher gate, then the KD grid. Restarted, it skips finished runs with the same config hash and
# resumes the rest:
# python sweep.py config/campaign_audio_quick.py --dry_run=True && python sweep.py config/campaign_audio_quick.py
# python report.py out/campaign_audio_quick
# Names starting with '_' are this file's helpers, not sweep.py keys.
out_root = 'out/campaign_audio_quick'
seeds = [42]
# tiny: 800 built-in clips of 1 s (64 x 101 log-mels), 5 epochs; a cache folder of its own, so the built-in sounds
# of a full-size run in cache/ are not rewritten. clip_seconds is a feature key: the KD runs get it too.
_recipe = dict(max_epochs=5, patience=3, batch_size=32, num_workers=0, builtin_clips=800, clip_seconds=1.0,
               cache_dir='cache/campaign_quick')
_cbam = [f'cbam_r{r}_k{k}' for r in (4, 8, 16) for k in (3, 7, 11)]
runs = [dict(name='crnn', script='train_audio.py', overrides=dict(_recipe, arch='crnn')),
        dict(name='tinycnn', script='train_audio.py', overrides=dict(_recipe, arch='tinycnn'))]
runs += [dict(name=f'cbam_r{r}_k{k}', script='train_audio.py',
              overrides=dict(_recipe, arch='tinycnn_cbam', cbam_reduction=r, cbam_kernel=k))
         for r in (4, 8, 16) for k in (3, 7, 11)]
# KD: train_kd.py checks the gate itself (teacher best val macro-F1 >= best baseline's + 0.03, else exit 3 =
# 'gated'). The CBAM student takes cbam_reduction/cbam_kernel from the phase-1 CBAM run with the best mean val
# macro-F1 over seeds, chosen when the KD run starts (best_of). alpha = 0 makes T irrelevant: once per student.
# Smoke only: a 5-epoch teacher is not held to seed 001's 0.03 gap, so gate_min_gap=-1.0 (gaps lie in [-1, 1]):
# the gate still reads every baseline and records its figures in each KD run's gate event, but never refuses.
_kd = dict(_recipe, teacher_ckpt='{out_root}/crnn/seed{seed}/best.pt', gate=True, gate_min_gap=-1.0,
           gate_baselines=['{out_root}/tinycnn/seed{seed}'] + [f'{{out_root}}/{n}/seed{{seed}}' for n in _cbam])
_best_cbam = dict(runs=_cbam, metric='val/macro_f1', mode='max', keys=['cbam_reduction', 'cbam_kernel'])
runs += [dict(name=f'kd_{s}_a{a}' + (f'_T{t:g}' if a else ''), script='train_kd.py', after=['crnn', 'tinycnn', *_cbam],
              overrides=dict(_kd, arch=s, alpha=a, temperature=t), **({'best_of': _best_cbam} if s != 'tinycnn' else {}))
         for s in ('tinycnn', 'tinycnn_cbam') for a in (0.0, 0.3, 0.6, 0.9) for t in ((4.0,) if a == 0 else (3.0, 4.0, 5.0))]
