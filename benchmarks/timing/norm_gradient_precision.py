"""Weight gradients of one fine-tuning loss in channels-last float32 with each instance-norm kernel
(cpu_channels_last_norm: torch's instance_norm, the plugin's precise layout-keeping kernel, group_norm), against
the same network in float64 and the standard layout. Real batches of a preprocessed dataset; optionally a trained
checkpoint's weights (realistic activations) instead of the initial ones.

    nnUNet_preprocessed=... nnUNet_results=/tmp/r nnUNet_n_proc_DA=0 \\
        python benchmarks/timing/norm_gradient_precision.py -d 4 -p nnUNetPlansCPUWide [--checkpoint CHECKPOINT]
"""
import argparse
import copy

import numpy as np
import torch

from nnunet_ssl.nnunet.cpu_fast import layout_keeping_instance_norms
from nnunet_ssl.step_cost import CPU_VARIANTS, _build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-d", required=True)
    ap.add_argument("-p", default="nnUNetPlans")
    ap.add_argument("--trainer", default="nnUNetTrainerFinetune_cpu_120ep")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args()
    tr = _build(a.trainer, a.d, "3d_fullres", a.p, torch.device("cpu"), variant=CPU_VARIANTS["fp32-cl-inorm"])
    if a.checkpoint:
        tr.network.load_state_dict(torch.load(a.checkpoint, map_location="cpu", weights_only=False)["network_weights"])
    torch.manual_seed(0)
    batches = [next(tr.dataloader_train) for _ in range(a.batches)]
    reference = copy.deepcopy(tr.network).double().to(memory_format=torch.contiguous_format)
    nets = {}
    for kernel in ("torch", "precise", "group_norm"):
        nets[kernel] = copy.deepcopy(tr.network)
        layout_keeping_instance_norms([nets[kernel]], kernel)
    errors = {k: [] for k in nets}
    for b in batches:
        reference.zero_grad()
        tr.loss([o.float() for o in reference(b["data"].double())], b["target"]).backward()
        for kernel, net in nets.items():
            net.zero_grad()
            tr.loss(net(b["data"].contiguous(memory_format=torch.channels_last_3d)), b["target"]).backward()
            # conv biases before a norm have no gradient but rounding (the norm removes them): left out
            errors[kernel] += [((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()).item()
                               for (name, p), q in zip(net.named_parameters(), reference.parameters())
                               if p.grad is not None and not name.endswith("conv.bias")]
    for kernel, e in errors.items():
        print(f"{kernel:11s} weight gradients against float64 (max error / largest entry, per tensor): "
              f"median {np.median(e):.1e}, worst {max(e):.1e}")


if __name__ == "__main__":
    main()
