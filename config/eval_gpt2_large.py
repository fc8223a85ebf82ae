# Evaluate OpenAI's gpt2-large on OpenWebText val (nanoGPT measured ~2.67) without training.
# python data/openwebtext/prepare.py && python train.py config/eval_gpt2_large.py

batch_size = 8
eval_iters = 500  # 500 x 8 x 1024 = ~4M tokens: a stable estimate
eval_only = True
wandb_log = False
init_from = "gpt2-large"
dataset = "openwebtext"
