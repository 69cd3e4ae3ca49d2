"""Power-iteration top eigenvalues against torch.linalg.eigvalsh of the exact block Hessian."""
from __future__ import annotations

import pytest
import torch

from hawqtool.sensitivity import get_objective
from hawqtool.sensitivity.eigen import top_eigenvalues
from hawqtool.sensitivity.ggn import math_attention

from test_hutchinson import llama_setup, mlp_setup


def exact_block_hessian(model, params, batches, objective, members) -> torch.Tensor:
    """Dense H_bb (averaged over batches) of the block made of `members`, by double backward."""
    obj = get_objective(objective)
    plist = [params[m] for m in members]
    n = sum(p.numel() for p in plist)
    H = torch.zeros(n, n, dtype=torch.float64)
    for batch in batches:
        with torch.no_grad():
            ref = obj.prepare(model, batch)
        with math_attention():
            loss = obj.loss(model, batch, ref)
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, plist, create_graph=True)])
            for i in range(n):
                row = torch.autograd.grad(g[i], plist, retain_graph=True)
                H[i] += torch.cat([r.reshape(-1) for r in row]).double()
    return H / len(batches)


@pytest.mark.parametrize("setup, objective, hvp", [(mlp_setup, "labels", "autograd"), (mlp_setup, "self-kl", "autograd"),
                                                   (llama_setup, "self-kl", "ggn")])
def test_power_iteration_finds_the_top_eigenvalue(setup, objective, hvp):
    model, params, batches = setup()
    names = list(params)[:2]
    blocks = {names[0]: [names[0]], "both": names}
    got = top_eigenvalues(model, params, batches, objective, blocks=blocks, max_iters=300, tol=1e-10, hvp=hvp)
    for bname, members in blocks.items():
        ev = torch.linalg.eigvalsh(exact_block_hessian(model, params, batches, objective, members))
        top = ev[ev.abs().argmax()].item()  # power iteration finds the largest magnitude
        assert got[bname].eigenvalue == pytest.approx(top, rel=1e-4), (bname, ev[-3:], ev[:2])


def test_bad_arguments():
    model, params, batches = mlp_setup()
    with pytest.raises(ValueError):
        top_eigenvalues(model, params, [], "labels")
    with pytest.raises(ValueError):
        top_eigenvalues(model, params, batches, "labels", max_iters=0)


def test_cli_eigen_flag_records_eigenvalues(tiny_llama, text_file, tmp_path):
    import json

    from click.testing import CliRunner

    from hawqtool.cli import main

    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["sensitivity", str(tiny_llama), "--calib", str(text_file), "--nsamples", "2",
                                  "--seqlen", "16", "--max-probes", "4", "--eigen", "--eigen-iters", "5", "-q",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert all(ls["top_eigenvalue"] is not None and 1 <= ls["eigen_iterations"] <= 5 for ls in d["layers"])
    assert all(ls["top_eigenvalue"] >= -1e-6 for ls in d["layers"])  # self-KL's Hessian is PSD at the own point
    assert d["settings"]["eigen"]["max_iters"] == 5
