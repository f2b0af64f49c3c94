# exported programs under second derivatives and torch.func transforms
import os, torch, torch.nn.functional as F, fused_softmax as fs
torch.manual_seed(0)
N, C, H = 5, 6, 4
x0 = torch.randn(N, C, dtype=torch.float64); t = torch.randint(0, C, (N,)); t[0] = -100
tp = torch.randn(N, C, dtype=torch.float64).softmax(1)
h0 = torch.randn(N, H, dtype=torch.float64); W0 = torch.randn(C, H, dtype=torch.float64)
class CE(torch.nn.Module):
    def forward(s, x, t): return fs.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01)
class LCE(torch.nn.Module):
    def forward(s, h, W, t): return fs.linear_cross_entropy(h, W, t, chunk_size=2, label_smoothing=0.1)
def rce(x, t):
    o = F.cross_entropy(x, t, label_smoothing=0.1, reduction="none")
    lse = torch.logsumexp(x, 1)
    if not t.is_floating_point(): lse = torch.where(t == -100, 0., lse)
    o = o + 0.01 * lse ** 2
    return o.sum() / ((t != -100).sum() if not t.is_floating_point() else t.shape[0])
rlce = lambda h, W, t: F.cross_entropy(F.linear(h, W), t, label_smoothing=0.1)
def tryit(name, f):
    try:
        r = f(); print(("ok  " if r < 1e-8 else "BAD ") + name, f"{r:.3g}")
    except Exception as e: print("EXC", name, type(e).__name__, str(e).splitlines()[0][:200])
for strict in (False, True):
    ce = torch.export.export(CE(), (x0, t), strict=strict).module()
    cep = torch.export.export(CE(), (x0, tp), strict=strict).module()
    lce = torch.export.export(LCE(), (h0, W0, t), strict=strict).module()
    s = f"strict={strict}"
    H1 = lambda f, *a: torch.autograd.functional.hessian(f, a[0]) 
    tryit(f"{s} hessian ce idx", lambda: (H1(lambda x: ce(x, t), x0) - H1(lambda x: rce(x, t), x0)).abs().max().item())
    tryit(f"{s} hessian ce prob (x and target)", lambda: max((a - b).abs().max().item() for a, b in zip(
        [y for r in torch.autograd.functional.hessian(lambda x, q: cep(x, q), (x0, tp)) for y in r],
        [y for r in torch.autograd.functional.hessian(lambda x, q: rce(x, q), (x0, tp)) for y in r])))
    tryit(f"{s} hessian ce(x, x)", lambda: (H1(lambda x: cep(x, x.softmax(1)), x0) - H1(lambda x: rce(x, x.softmax(1)), x0)).abs().max().item())
    tryit(f"{s} hessian lce (h, W)", lambda: max((a - b).abs().max().item() for a, b in zip(
        [y for r in torch.autograd.functional.hessian(lambda h, W: lce(h, W, t), (h0, W0)) for y in r],
        [y for r in torch.autograd.functional.hessian(lambda h, W: rlce(h, W, t), (h0, W0)) for y in r])))
    tryit(f"{s} tied lce(W[:5], W) grad-of-loss**2", lambda: (torch.autograd.functional.hessian(lambda W: lce(W[:N], W, t) ** 2, W0) - torch.autograd.functional.hessian(lambda W: rlce(W[:N], W, t) ** 2, W0)).abs().max().item())
    tryit(f"{s} func.grad ce", lambda: (torch.func.grad(lambda x: ce(x, t))(x0) - torch.func.grad(lambda x: rce(x, t))(x0)).abs().max().item())
    tryit(f"{s} func.hessian ce", lambda: (torch.func.hessian(lambda x: ce(x, t))(x0) - torch.func.hessian(lambda x: rce(x, t))(x0)).abs().max().item())
    tryit(f"{s} func.grad lce", lambda: (torch.func.grad(lambda W: lce(h0, W, t))(W0) - torch.func.grad(lambda W: rlce(h0, W, t))(W0)).abs().max().item())
    tryit(f"{s} func.jacfwd(grad) ce", lambda: (torch.func.jacfwd(torch.func.grad(lambda x: ce(x, t)))(x0) - torch.func.hessian(lambda x: rce(x, t))(x0)).abs().max().item())
    tryit(f"{s} vmap ce", lambda: (torch.vmap(lambda x: ce(x, t))(x0[None].expand(3, N, C)) - rce(x0, t)).abs().max().item())
print("INTERPRET", os.environ.get("TRITON_INTERPRET"))
