"""Superseded by bench/gpu.py, the harness's GPU mode (`python -m bench.run --gpu`): the same figures (open_clip_train
peer, MFU, peak memory, data wait, torch.compile, CoCa ViT-L-14 captions/s) plus UperNet ViT-B/16 finetune steps/s;
it runs each peer before our side so the two never share GPU memory. Kept so `python -m bench.gpu_peers` still works
(`--skip-coca` is now `--skip coca`)."""
import sys

from bench.gpu import main

if __name__ == "__main__":
    main(argv=sys.argv[1:])
