# Evaluate OpenAI's gpt2 on OpenWebText val (nanoGPT measured ~3.12) without training.
# python data/openwebtext/prepare.py && python train.py config/eval_gpt2.py

batch_size = 8
eval_iters = 500  # 500 x 8 x 1024 = ~4M tokens: a stable estimate
eval_only = True
wandb_log = False
init_from = "gpt2"
dataset = "openwebtext"
