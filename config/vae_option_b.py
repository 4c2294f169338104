# Seed 002's option B on the built-in colour grids (C = 10, ~93% background): focal loss gamma 2 with
# sqrt_inverse class weights (the inverse 123:1 smoothed to ~11:1). Quick test (5 epochs):
# python train_vae.py config/vae_option_b.py --quick_test=True
out_dir = 'out/vae_option_b'
dataset_kind = 'grids'
objective = 'beta'  # the seed's plain beta-VAE
num_images = 10_000
recon_loss = 'focal'
focal_gamma = 2.0
use_class_weights = True
class_weight_method = 'sqrt_inverse'
max_epochs = 20
