"""A router defined here, outside the package, registered through vitmoe.moe.register_router: the
model, `vitmoe info`, `vitmoe train --router` and the run label take it with no other file edited.

Registration is global for the test session (pytest imports this module at collection), which
also checks that the rest of the suite tolerates one more router and one more MoEConfig field.
"""
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vitmoe
from vitmoe.models import model_config
from vitmoe import ConfigError, MoEConfig
from vitmoe.cli.main import main
from vitmoe.moe import ROUTERS, Router, Routing, register_router
from vitmoe.moe import Options
from vitmoe.moe.routers import ScoringOptions
from vitmoe.rundir import read_metrics
from vitmoe.training import model_label, resolve_model_file


@dataclass
class BiasOptions(Options):
    router_bias_init: float = 0.0
    """Router "biased": the initial value of every expert's logit bias."""

    def check(self, f, experts):
        super().check(f, experts)
        f.number("router_bias_init", -10.0, 10.0)


@register_router("biased")
class BiasedRouter(Router):
    """Top-1 softmax router whose linear map has a bias: D*E + E parameters per layer."""

    options = (ScoringOptions, BiasOptions)

    def __init__(self, dim, num_experts, config):
        super().__init__(dim, num_experts, config)
        # Parameters, not an nn.Linear: the model's weight init resets every Linear's bias to 0.
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.full((num_experts,), float(config.router_bias_init)))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self._weights = {"z": config.z_loss_weight}

    @property
    def aux_weights(self):
        return self._weights

    @classmethod
    def check_config(cls, f, experts):
        f.need(f.obj.top_k == 1, "top_k", "1 for router 'biased'")

    @classmethod
    def router_params(cls, dim, num_experts, config):
        return dim * num_experts + num_experts

    def forward(self, x_BND, capacity=None):
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_TE = x_BND.reshape(-1, x_BND.shape[-1]).float() @ self.weight.float().t() + self.bias.float()
            probs_TE = logits_TE.softmax(dim=-1)
            gates_TK, experts_TK = probs_TE.topk(1, dim=-1)
        z = torch.logsumexp(logits_TE, dim=-1).square().mean()
        return Routing(gates_TK=gates_TK, experts_TK=experts_TK, probs_TE=probs_TE, aux={"z": z})


# A digits model (8x8x1, 10 classes): D 16, depth 2, MLP 32, 4x4 patches, linear head, both
# blocks MoE with 2 experts.
D, H, E, N = 16, 32, 2, 5  # N: 4 patches + the class token
MODEL_SETS = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.mlp_hidden=32",
              "model.patch_size=4", "model.head=linear", "model.moe_layers=all", "model.num_experts=2"]


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


def test_the_router_joins_the_registry_and_moe_config():
    assert ROUTERS["biased"] is BiasedRouter
    assert MoEConfig.field_names()[-3:] == ["router_bias_init", "expert_init", "dispatch"]
    cfg = MoEConfig(router="biased", router_bias_init=0.5).validate([2])
    assert (cfg.router, cfg.router_bias_init, cfg.to_dict()["router_bias_init"]) == ("biased", 0.5, 0.5)
    assert MoEConfig().router_bias_init == 0.0
    with pytest.raises(ConfigError, match=r"moe\.router_bias_init=20\.0.*\[-10\.0, 10\.0\]"):
        MoEConfig(router="biased", router_bias_init=20.0).validate([2])
    with pytest.raises(ConfigError, match=r"top_k=2.*1 for router 'biased'"):
        MoEConfig(router="biased", top_k=2).validate([2])
    with pytest.raises(ValueError, match="already registered"):
        register_router("biased")(type("Other", (BiasedRouter,), {}))


def test_model_label_and_info_of_the_new_router(capsys):
    mc = model_config("switch_vit", img_size=8, in_chans=1, embed_dim=D, depth=2, num_heads=2,
                             mlp_hidden=H, patch_size=4, head="linear", num_experts=E,
                             moe={"router": "biased", "router_bias_init": 0.25})
    model = vitmoe.VisionTransformer(mc)
    routers = [m.router for _, m in model.moe_modules()]
    assert len(routers) == 2 and all(isinstance(r, BiasedRouter) for r in routers)
    assert all(torch.all(r.bias == 0.25) for r in routers)
    assert model_label(mc) == "biased-vit"
    assert model_label(mc.replace(share_blocks=True)) == "widenet-biased-vit"

    # By hand: embedding 1*16*16+16 (patches) + 16 (class token) + 5*16 (positions) = 368; per block
    # attention 3*16*16+3*16 + 16*16+16 = 1088 and 2 LayerNorms 64; an expert 16*32+32+32*16+16 =
    # 1072; the router 16*2+2 = 34; final norm 32 and head 16*10+10 = 170.
    total = 368 + 2 * (1088 + 64 + 2 * 1072 + 34) + 32 + 170
    active = 368 + 2 * (1088 + 64 + 1072 + 34) + 32 + 170
    merged = 368 + 2 * (1088 + 64 + 1072) + 32 + 170
    # FLOPs: patches 2*4*16*16 = 2048; per block attention 2*5*4*16*16 + 2*2*5*5*16 = 11840, one
    # expert per token 2*5*2*16*32 = 10240, router 2*5*34 = 340; head 2*16*10 = 320.
    flops = 2048 + 2 * (11840 + 10240 + 340) + 320
    assert (total, active, merged, flops) == (7230, 5086, 5018, 47208)
    assert sum(p.numel() for p in model.parameters()) == total
    info = vitmoe.model_info(mc)
    assert (info.total_params, info.active_params_per_token, info.merged_params,
            info.forward_flops_per_image, info.mergeable) == (total, active, merged, flops, True)

    assert main(["info", "switch_vit", "--dataset", "digits", "--json",
                 *_sets(*MODEL_SETS, "model.moe.router=biased")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in ("total_params", "active_params_per_token", "merged_params",
                                    "forward_flops_per_image")} == {
        "total_params": total, "active_params_per_token": active, "merged_params": merged,
        "forward_flops_per_image": flops}
    assert main(["info", "switch_vit", "--dataset", "digits", *_sets(*MODEL_SETS, "model.moe.router=biased")]) == 0
    out = capsys.readouterr().out
    assert "router biased" in out and "7,230" in out and "47,208" in out


def test_vitmoe_train_takes_the_new_router(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "switch_vit", "--dataset", "digits", "--epochs", "1", "--batch", "128",
            "--lr", "2e-3", "--router", "biased", "--out", str(run),
            *_sets(*MODEL_SETS, "model.moe.router_bias_init=0.5", "log_every=0")]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["name"] == "biased-vit"
    assert (summary["params"], summary["active_params"], summary["merged_params"]) == (7230, 5086, 5018)
    assert summary["epochs"] == 1 and summary["steps"] == math.ceil(1438 / 128)
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 1
    assert all(math.isfinite(rows[0][k]) for k in ("train_loss", "test_loss", "test_acc"))
    assert 0.0 <= rows[0]["test_acc"] <= 100.0 and rows[0]["train_loss"] > 0
    model = vitmoe.load_model(resolve_model_file(run))
    assert model.config.moe.router == "biased" and model.config.moe.router_bias_init == 0.5
    assert all(isinstance(m.router, BiasedRouter) for _, m in model.moe_modules())
    # Training moved the biases away from their initial value.
    assert any(not torch.all(m.router.bias == 0.5) for _, m in model.moe_modules())


def test_an_unregistered_router_is_refused_by_name(capsys, no_data, tmp_path):
    # The flag's choices are the registry's names when the parser is built.
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "switch_vit", "--dataset", "digits", "--router", "nosuch",
              "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'nosuch'" in err and "'biased'" in err
    # Through the config: the field check names the registered routers.
    assert main(["info", "switch_vit", "--set", "model.moe.router=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "moe.router='nosuch'" in err and "biased" in err and "switch" in err
