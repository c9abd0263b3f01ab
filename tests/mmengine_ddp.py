"""mmengine DDP on 2 CPU processes (gloo) with TritonEMAHook; run by tests/test_mmengine.py under torchrun."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mmengine_cases as cases  # noqa: E402

from triton_ema.integrations.mmengine import TritonEMAHook  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    # mmengine's own init_dist("pytorch") calls torch.cuda.set_device; on CPU the script opens the gloo group
    # itself (the runner then uses it), and DDP wraps the model without device_ids.
    torch.distributed.init_process_group("gloo")
    # EMAHook's first update copies.
    hook, reference = TritonEMAHook(momentum=0.3), cases.Float64EMA(lambda t: 1.0 if t == 0 else 0.3)
    runner = cases.runner(out, [hook, reference], 2, launcher="pytorch",
                          cfg=dict(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None,
                                                         broadcast_buffers=False)),
                          default_hooks=dict(checkpoint=None, logger=None, timer=None, param_scheduler=None,
                                             sampler_seed=None))
    runner.train()
    torch.save({"world_size": runner.world_size, "steps": hook.ema.num_steps, "reference": reference.ema,
                "ema": list(hook.ema.ema_state_dict().values()), "params": [p.detach() for p in runner.model.parameters()]},
               out / f"rank{runner.rank}.pt")
