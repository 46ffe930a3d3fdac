"""Per-image routing (router "image", Mobile V-MoE): against a float64 transcription, whole images
per expert, the balance loss over images by hand, capacity in images, expert parallelism (super-class guidance too)."""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_workers

from vitmoe.models import model_config, model_info
from vitmoe.moe import MoEMlp, collect_moe_outputs, routing_labels
from vitmoe.moe.parallel import init_expert_parallel
from vitmoe.training.distributed.expert_parallel import shard_experts
from vitmoe.validation import ConfigError

D, H, E = 12, 20, 4


def make(k=1, cf=None, path="padded", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    m = MoEMlp(D, H, num_experts=E, router="image", top_k=k, capacity_factor_train=cf, capacity_factor_eval=cf,
               expert_init="independent", dispatch=path, **kw).to(dtype)
    with torch.no_grad():
        m.experts.b1.normal_()
        m.experts.b2.normal_()
        m.router.weight.normal_()  # decisive scores: no near-ties between experts
    return m


def transcription(m, x_BND, k, capacity=None, pool="mean"):
    """Image by image in float64: pooled vector, softmax, top-k with renormalised gates; an expert
    takes images in batch order, every first choice before any second choice, up to `capacity`."""
    e = {n: getattr(m.experts, n).double() for n in ("w1", "b1", "w2", "b2")}
    W = m.router.weight.double()
    x = x_BND.double()
    B = x.shape[0]
    pooled = x[:, 0] if pool == "cls" else x.mean(1)
    probs = (pooled @ W.t()).softmax(-1)
    gates, experts = probs.topk(k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True) if k > 1 else gates
    taken = [0] * E
    out = torch.zeros_like(x)
    for j in range(k):
        for b in range(B):
            i = int(experts[b, j])
            if capacity is not None and taken[i] >= capacity:
                continue  # the whole image's copy is dropped
            taken[i] += 1
            out[b] += gates[b, j] * (F.gelu(x[b] @ e["w1"][i] + e["b1"][i]) @ e["w2"][i] + e["b2"][i])
    return out, probs, experts


@pytest.mark.parametrize("k,cf,pool", [(1, None, "mean"), (2, None, "mean"), (1, 1.0, "mean"), (2, 0.5, "cls")])
def test_equals_float64_transcription_with_gradients(k, cf, pool):
    m = make(k=k, cf=cf, image_pool=pool)
    x = torch.randn(7, 5, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    C = m.capacity(7 * 5, 5)
    assert C == (None if cf is None else -(-int(cf * 7 * k) // E))  # counted in images
    ref, _, _ = transcription(m, x, k, C, pool)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    gy = torch.autograd.grad((y * w).sum(), [x, m.router.weight, m.experts.w1])
    gr = torch.autograd.grad((ref * w).sum(), [x, m.router.weight, m.experts.w1])
    for a, b in zip(gy, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fp32_grouped_path_equals_the_float64_layer():
    m64 = make(k=2, cf=None)
    m32 = make(k=2, cf=None, path="grouped", dtype=torch.float32)
    m32.load_state_dict({n: t.float() for n, t in m64.state_dict().items()})
    x = torch.randn(6, 9, D, dtype=torch.float64)
    torch.testing.assert_close(m32(x.float()).double(), m64(x), rtol=1e-4, atol=1e-5)


def test_every_token_of_an_image_goes_to_its_image_expert():
    m = make(k=1, cf=0.5)  # capacity 2 images per expert of 8 x 1 / 4: some images dropped whole
    x = torch.randn(8, 6, D, dtype=torch.float64)
    with collect_moe_outputs(m, record=True) as moe:
        y = m(x)
    expert_T = moe.routing()[""][0]["expert_T"].view(8, 6)
    assert (expert_T == expert_T[:, :1]).all(), "tokens of one image split between experts"
    _, _, experts = transcription(m, x, 1)
    kept = expert_T[:, 0] >= 0
    assert torch.equal(expert_T[kept, 0], experts[kept, 0])
    assert (y[~kept] == 0).all() and (y[kept].abs().sum((1, 2)) > 0).all()  # dropped images: zero, whole
    stats = moe.stats()[""]
    assert float(stats["load"].sum()) == 8 * 6  # copies counted per token
    assert float(stats["dropped_frac"]) == pytest.approx(float((~kept).sum()) / 8)


def test_balance_and_z_loss_over_images_by_hand():
    m = make(k=2)
    x = torch.randn(10, 4, D, dtype=torch.float64)
    with collect_moe_outputs(m) as moe:
        m(x)
    aux = moe.aux_terms()
    _, probs, experts = transcription(m, x, 2)
    f = torch.tensor([(experts[:, 0] == i).sum().item() / 10 for i in range(E)], dtype=torch.float64)
    balance = E * sum(f[i] * probs[:, i].mean() for i in range(E))
    logits = x.mean(1) @ m.router.weight.t()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(aux["balance"], balance.detach())
    torch.testing.assert_close(aux["z"], z.detach())


def test_cls_pool_needs_a_class_token_and_flops_count_one_score_per_image():
    with pytest.raises(ConfigError, match="image_pool"):
        model_config("cct_2_3x2", moe_layers="all", **{"moe.router": "image", "moe.image_pool": "cls"}).validate()
    cfg = model_config("vit", depth=2, embed_dim=32, num_heads=2, mlp_hidden=64, moe_layers="all", num_experts=4,
                       **{"moe.router": "image", "moe.top_k": 2})
    dense = model_info(model_config("vit", depth=2, embed_dim=32, num_heads=2, mlp_hidden=64))
    info = model_info(cfg)
    N = cfg.num_tokens
    # Top-2: each token's MLP work doubles; the router adds 2 x D x E per image and layer.
    assert info.forward_flops_per_image - dense.forward_flops_per_image == 2 * (2 * N * 2 * 32 * 64 + 2 * 32 * 4)


def _ep_worker(rank, world):
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
    ref = make(k=2, cf=1.0)
    y_ref = ref(x)
    m = make(k=2, cf=1.0)
    group = init_expert_parallel(world)
    shard_experts(m, group)
    torch.testing.assert_close(m(x), y_ref, rtol=1e-12, atol=1e-12)
    # Super-class guidance: the replicated router's term and gradient are each rank's own images'.
    labels, superclasses = torch.tensor([0, 4, 5]), [0, 1, 2, 3, 0, 1]
    ref, m = make(k=2, cf=1.0, superclasses=superclasses), make(k=2, cf=1.0, superclasses=superclasses)
    shard_experts(m, group)
    terms = []
    for layer in (ref, m):
        with routing_labels(layer, labels), collect_moe_outputs(layer) as moe:
            out = layer(x)
        term = moe.layer_aux()[""]["superclass"]
        terms.append((out, term, torch.autograd.grad(term, layer.router.weight)[0]))
    for a, b in zip(*terms):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_expert_parallel_equals_one_process():
    run_workers(_ep_worker, 2, timeout=120)
