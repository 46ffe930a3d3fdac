"""freeze_unrouted: an expert that got no token keeps its weights and Adam state bitwise; the others
take exactly the plain AdamW step."""
import copy

import pytest
from conftest import TINY_DIGITS, TINY_MC

from vitmoe.training.config import resolve
import torch
import torch.nn.functional as F

import vitmoe
from vitmoe.models import ConfigError, VisionTransformer
from vitmoe.moe import seed_random_routers
from vitmoe.training import TrainConfig, Trainer
from vitmoe.training.checkpoints.checkpoint import latest_checkpoint, load_state
from vitmoe.training.recipe.freeze import UnroutedFreeze

EXPERT_KEYS = ("w1", "b1", "w2", "b2")


def _twin(model, opt):
    """A copy of the model (same route generator states) and of its AdamW state."""
    ref = copy.deepcopy(model)
    for (_, m), (_, r) in zip(model.moe_modules(), ref.moe_modules()):
        r.router.generator = torch.Generator().manual_seed(0)
        r.router.generator.set_state(m.router.generator.get_state())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
    return ref, ref_opt


def _step(model, opt, x, y, freeze=None):
    out = model(x, return_aux=True)
    opt.zero_grad()
    (F.cross_entropy(out.logits, y) + out.aux_loss).backward()
    saved = freeze.snapshot() if freeze is not None else None
    opt.step()
    if saved is not None:
        freeze.restore(saved, [out])
    return out


def test_unrouted_experts_keep_weights_and_adam_state_bitwise_the_others_take_the_plain_step():
    torch.manual_seed(0)
    model = vitmoe.create_model("random_vit", moe={"expert_init": "independent"}, **TINY_DIGITS)
    seed_random_routers(model, 0, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freeze = UnroutedFreeze(model, opt)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    frozen_rows = 0
    for step in range(3):  # the first step creates the moments: frozen rows stay at their zeros
        ref, ref_opt = _twin(model, opt)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                   if p in opt.state}
        out = _step(model, opt, x, y, freeze)
        _step(ref, ref_opt, x, y)
        params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
        for name, layer in model.moe_modules():
            routed = out.moe_stats[name]["load"] > 0
            assert int(routed.sum()) == 1  # batch granularity, top-1: one expert per layer per step
            for key in EXPERT_KEYS:
                n = f"{name}.experts.{key}"
                p, r = params[n], ref_params[n]
                for e in range(4):
                    if routed[e]:
                        assert torch.equal(p[e], r[e]), (step, n, e)
                        for k in ("exp_avg", "exp_avg_sq"):
                            assert torch.equal(opt.state[p][k][e], ref_opt.state[r][k][e])
                    else:
                        frozen_rows += 1
                        assert torch.equal(p[e], before[n][e]), (step, n, e)
                        assert not torch.equal(r[e], before[n][e]) or key.startswith("b")  # AdamW moved it
                        for k in ("exp_avg", "exp_avg_sq"):
                            old = moments[n][k][e] if n in moments else torch.zeros_like(p[e])
                            assert torch.equal(opt.state[p][k][e], old)
        for n, p in params.items():  # everything outside the experts: the plain step
            if ".experts." not in n:
                assert torch.equal(p, ref_params[n]), n
        for p in params.values():
            assert int(opt.state[p]["step"]) == step + 1
    assert frozen_rows == 3 * 2 * 4 * 3


def _cfg(tmp_path, name, **kw):
    mc = dict(TINY_MC)
    base = dict(model="random_vit", dataset="digits", epochs=1, batch_size=128, lr=2e-3, optimizer="adamw",
                weight_decay=0.05, model_config={**mc, "num_experts": 16}, out=str(tmp_path / name),
                log_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_leaves_never_routed_experts_at_their_initial_weights(tmp_path, digits):
    tr, te = digits
    runs = {}
    for name, freeze in (("frozen", True), ("plain", False)):
        Trainer(_cfg(tmp_path, name, freeze_unrouted=freeze), log=lambda m: None, train_data=tr, test_data=te).fit()
        ck = latest_checkpoint(tmp_path / name)
        runs[name] = (vitmoe.load_model(ck / "model.safetensors").state_dict(), load_state(ck))
    cfg = _cfg(tmp_path, "x").validate()
    torch.manual_seed(cfg.seed)
    init = VisionTransformer(resolve(cfg).model).state_dict()
    weights, state = runs["frozen"]
    loads = state["history"][0]["expert_load"]
    unrouted = {name: [e for e, n in enumerate(load) if n == 0] for name, load in loads.items()}
    # 12 steps, one expert of 16 per layer per step: at least 4 experts per layer never got a token.
    assert all(len(u) >= 4 for u in unrouted.values()), unrouted
    plain = runs["plain"][0]
    for name, experts in unrouted.items():
        for key in ("w1", "w2"):
            k = f"{name}.experts.{key}"
            for e in experts:
                assert torch.equal(weights[k][e], init[k][e]), (k, e)
                assert not torch.equal(plain[k][e], init[k][e]), (k, e)  # AdamW's weight decay moved it
    routed = [e for e in range(16) if e not in unrouted["blocks.0.mlp"]]
    assert not torch.equal(weights["blocks.0.mlp.experts.w1"][routed[0]], init["blocks.0.mlp.experts.w1"][routed[0]])


@pytest.mark.parametrize("kw, needles", [
    (dict(model="vit", model_config={}), ["freeze_unrouted", "dense"]),
    (dict(model="switch_vit", model_config={"router": "soft"}), ["freeze_unrouted", "Soft MoE"]),
    (dict(freeze_unrouted="maybe"), ["freeze_unrouted", "true or false"]),
])
def test_freeze_unrouted_validation(tmp_path, kw, needles):
    kw.setdefault("freeze_unrouted", True)
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "bad", **kw).validate()
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert _cfg(tmp_path, "ok", model="switch_vit", freeze_unrouted="yes").validate().freeze_unrouted is True


# ---- the row snapshot (snapshot(passes)) against the full copy it replaced (snapshot()) ----------

def _freeze_twins(model_name, num_experts, seed=0, ep=None):
    """Two identical models (route generators included), each with a fused AdamW and a freeze."""
    from vitmoe.training import adam_kwargs
    from vitmoe.training.distributed.expert_parallel import shard_experts

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        m = vitmoe.create_model(model_name, moe={"expert_init": "independent"}, **dict(TINY_DIGITS, num_experts=num_experts))
        if ep is not None:
            shard_experts(m, ep)
        seed_random_routers(m, 0, torch.device("cpu"))
        opt = torch.optim.AdamW(list(m.parameters()), lr=1e-2, weight_decay=0.1, **adam_kwargs(m))
        out.append((m, opt, UnroutedFreeze(m, opt, world)))
    return out


def _freeze_steps(twins, batches):
    """Train both twins on `batches`: the first with the row snapshot, the second with the full copy.
    Yields (step, the first's snapshot bytes, bytes its unrouted rows hold, the full copy's bytes,
    the first's forward output)."""
    (a, opt_a, fa), (b, opt_b, fb) = twins
    for step, (x, y) in enumerate(batches):
        outs = []
        for m, opt in ((a, opt_a), (b, opt_b)):
            out = m(x, return_aux=True)
            opt.zero_grad()
            (F.cross_entropy(out.logits, y) + out.aux_loss).backward()
            outs.append(out)
        had_moments = bool(opt_a.state)
        saved = fa.snapshot([outs[0]])
        full = fb.snapshot()
        opt_a.step()
        opt_b.step()
        fa.restore(saved, [outs[0]])
        fb.restore(full, [outs[1]])
        expected = 0
        for name, layer in fa.layers:
            unrouted = int((~fa.routed(name, layer, [outs[0]])).sum())
            row = sum(getattr(layer.experts, k)[0].nbytes for k in EXPERT_KEYS)
            expected += unrouted * row * (1 + 2 * had_moments)  # + exp_avg, exp_avg_sq once they exist
        yield step, sum(s.nbytes() for s in saved), expected, sum(s.nbytes() for s in full), outs[0]
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (step, n)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt_a.state[p][k], opt_b.state[q][k]), (step, n, k)


@pytest.mark.parametrize("path", ["rows", "mask"])
@pytest.mark.parametrize("model_name, num_experts", [("random_vit", 4), ("switch_vit", 16)])
def test_snapshot_holds_only_the_unrouted_rows_and_restores_what_the_full_copy_did(model_name, num_experts, path,
                                                                                    monkeypatch):
    """Bit for bit the result of the full copy, on the CPU's row path and on the masked path that
    accelerators take (forced here); the row snapshot's bytes are the unrouted rows' and nothing more."""
    if path == "mask":
        monkeypatch.setattr("vitmoe.training.recipe.freeze._rows_are_free", lambda routed: False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 1, 8, 8, generator=g), torch.randint(10, (2,), generator=g)) for _ in range(4)]
    sizes = []
    for step, got, expected, full, _ in _freeze_steps(_freeze_twins(model_name, num_experts), batches):
        sizes.append((got, expected, full))
        assert got == (expected if path == "rows" else full), step
    if path == "rows":
        assert all(0 < got < full for got, _, full in sizes[1:]), sizes  # some experts routed, some not


def _ep_worker(rank, world, ep_size):
    from vitmoe.moe.parallel import init_expert_parallel

    ep = init_expert_parallel(ep_size) if ep_size > 1 else None
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own images: the loads differ by rank
    batches = [(torch.randn(2, 1, 8, 8, generator=g), torch.randint(10, (2,), generator=g)) for _ in range(3)]
    twins = _freeze_twins("switch_vit", 8, ep=ep)
    fa, differs = twins[0][2], torch.zeros(())
    for step, got, expected, _, out in _freeze_steps(twins, batches):
        assert got == expected, (rank, step)
        for name, layer in fa.layers:
            start, n = layer.experts.ep.local_range(8) if ep is not None else (0, 8)
            alone = out.moe_stats[name]["load"][start:start + n] > 0
            differs += (alone != fa.routed(name, layer, [out])).any()
    # The case the all-reduce is for happened: a rank's own tokens missed an expert another rank's reached.
    torch.distributed.all_reduce(differs)
    assert differs > 0


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_row_snapshot_equals_the_full_copy_on_two_ranks(ep_size):
    from dist_utils import run_workers

    run_workers(_ep_worker, 2, ep_size, timeout=120)
