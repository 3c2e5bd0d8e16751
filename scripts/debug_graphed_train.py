"""Reproduces the capture failure of native/NOTES.md ("Graphed training") that
MoELayer.forget_last_call() avoids: capturing the layer's backward through
torch.cuda.make_graphed_callables after an eager training step on the default stream.

    TORCH_SHOW_CPP_STACKTRACES=1 python scripts/debug_graphed_train.py [cf] [eager-first] [release]

eager-first: one eager training step on the default stream before the capture; release: then drop
the layer's references to that call (l_aux, losses, last_routing keep its autograd graph, and with
it AccumulateGrad nodes bound to the default stream, alive).
"""
import sys

import torch

import adaptmoe as am


class WithAux(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x_TD):
        y = self.layer(x_TD)
        return y, y.l_aux


def main() -> None:
    cf = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=64, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=cf),
                       experts=am.ExpertConfig(hidden_size=128))
    module = WithAux(am.MoELayer(cfg).cuda())
    x = torch.randn(96, 64, device="cuda", requires_grad=True)
    if "eager-first" in sys.argv:
        y, l_aux = module(x)
        torch.autograd.backward([y, l_aux], [torch.ones_like(y), torch.ones_like(l_aux)])
        del y, l_aux
        if "release" in sys.argv:
            module.layer.l_aux = module.layer.losses = module.layer.last_routing = None
    try:
        torch.cuda.make_graphed_callables(module, (x,))
        print("captured")
    except Exception as exc:  # noqa: BLE001 - a diagnostic: print everything
        print(str(exc)[:6000])


if __name__ == "__main__":
    main()
