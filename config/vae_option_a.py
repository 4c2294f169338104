# Seed 002's option A on the built-in colour grids (C = 10, ~93% background): focal loss gamma 2, no class weights.
# In the seed it mode-collapsed to all background. Quick test (5 epochs):
# python train_vae.py config/vae_option_a.py --quick_test=True
out_dir = 'out/vae_option_a'
dataset_kind = 'grids'
objective = 'beta'  # the seed's plain beta-VAE
num_images = 10_000
recon_loss = 'focal'
focal_gamma = 2.0
use_class_weights = False
max_epochs = 20
