r"""Variational autoencoders with flow posteriors and flow priors (Bernoulli pixels).

The model and guide are plain Pyro programs over one data plate:

.. code-block:: python

    def model(x):                                   # p(z) p(x | z)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", prior)             # N(0, I) or a learned flow: prior_flow()
            pyro.sample("x", Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):                                   # q(z | x)
        with pyro.plate("data", len(x)):
            loc, scale, h = encoder(x)
            q0 = Normal(loc, scale).to_event(1)     # the encoder's Gaussian ...
            pyro.sample("z", posterior_flow(h, base=q0))  # ... pushed through flow layers conditioned on h

The encoder-driven base is what makes flow posteriors work (Rezende and
Mohamed 2015; IAF, Kingma et al. 2016; Sylvester flows, van den Berg et al.
2018): with a fixed standard-normal base every image's posterior would start
at the prior and the layers alone would have to carry all of ``x``'s
information.  ``posterior="gaussian"`` is the plain VAE (no layers).

A learned prior is any :class:`~pyroflows.Flow`, sampled as
``pyro.sample("z", prior_flow())`` and trained jointly with the decoder.  The
pitfall: the KL term of the ELBO has no closed form with a flow on either
side, so train with ``Trace_ELBO`` (KL estimated by sampling, as here), not
``TraceMeanField_ELBO`` (which would need an analytic KL).  A flow prior
also needs the prior's cheap direction to be scoring (``log_prob`` of the
guide's samples every step): coupling flows (``realnvp``, ``nsf``) and MAF
are cheap both ways or for scoring; IAF is not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from .. import flows
from ..flow import Flow
from .iwae import IWAEResult, iwae_bounds

__all__ = ["POSTERIORS", "VAE", "binarize", "evaluate_vae", "make_posterior", "train_vae", "vae_demo_section"]

#: The posterior kinds :func:`make_posterior` builds (``"gaussian"``: no flow layers).
POSTERIORS = ("gaussian", "planar", "radial", "sylvester", "iaf", "nsf")


def make_posterior(kind: str, latent_dim: int, context_dim: int, *, num_layers: int | None = None,
                   hidden_dims: Sequence[int] = (64, 64)) -> Flow | None:
    """The conditional flow of an amortized posterior, used as ``flow(h, base=q0)``;
    ``None`` for ``"gaussian"``.  Planar/radial/Sylvester are the amortized twins
    (their parameters an offset plus an MLP of ``h``); IAF and NSF condition
    their MADE/coupling networks on ``h``."""
    if kind == "gaussian":
        return None
    if kind == "planar":
        return flows.planar(latent_dim, num_layers=num_layers or 8, context_dim=context_dim)
    if kind == "radial":
        return flows.radial(latent_dim, num_layers=num_layers or 8, context_dim=context_dim)
    if kind == "sylvester":
        return flows.sylvester(latent_dim, num_layers=num_layers or 4, context_dim=context_dim)
    if kind == "iaf":
        return flows.iaf(latent_dim, num_layers=num_layers or 2, hidden_dims=hidden_dims, context_dim=context_dim)
    if kind == "nsf":
        return flows.nsf(latent_dim, num_layers=num_layers or 2, hidden_dims=hidden_dims, context_dim=context_dim)
    raise ValueError(f"unknown posterior {kind!r}; choose one of {', '.join(POSTERIORS)}")


def _mlp(widths):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ELU()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    r"""A VAE for binary data: Bernoulli decoder, encoder emitting ``(loc, scale, h)``.

    Args:
        data_dim: pixels per image (flattened).
        latent_dim: dimension of :math:`z`.
        hidden_dims: widths of the encoder's and decoder's hidden layers.
        posterior: a kind from :data:`POSTERIORS`, or a conditional :class:`~pyroflows.Flow`
            (``context_dim`` = ``context_dim``) or ``None`` (Gaussian).
        prior: ``None`` for :math:`N(0, I)`, or a :class:`~pyroflows.Flow` over ``latent_dim``
            trained jointly (see the module docstring for the pitfall).
        context_dim: width of the encoder's context ``h`` for the posterior flow.

    ``model(x)`` and ``guide(x)`` are the Pyro programs (``x`` of shape
    ``(N, data_dim)``, values in {0, 1}; the data plate is ``"data"``).
    """

    def __init__(self, data_dim: int, latent_dim: int = 16, hidden_dims: Sequence[int] = (256, 256),
                 posterior: str | Flow | None = "gaussian", prior: Flow | None = None, context_dim: int = 32,
                 **posterior_kw):
        super().__init__()
        if isinstance(posterior, str):
            posterior = make_posterior(posterior, latent_dim, context_dim, **posterior_kw)
        if posterior is not None and not isinstance(posterior, Flow):
            raise TypeError(f"posterior must be a kind name, a Flow or None, got {type(posterior).__name__}")
        if prior is not None and not isinstance(prior, Flow):
            raise TypeError(f"prior must be a Flow or None, got {type(prior).__name__}")
        self.data_dim, self.latent_dim, self.context_dim = data_dim, latent_dim, context_dim
        self.encoder = _mlp([data_dim, *hidden_dims, 2 * latent_dim + (context_dim if posterior is not None else 0)])
        self.decoder = _mlp([latent_dim, *hidden_dims[::-1], data_dim])
        self.posterior = posterior
        self.prior = prior
        self.register_buffer("_zero", torch.zeros(latent_dim))
        #: weight of the latent terms log p(z) - log q(z|x) in the training ELBO (KL warm-up; 1 = the ELBO)
        self.kl_scale = 1.0

    def prior_dist(self):
        """:math:`p(z)`: the flow prior's distribution, or a standard normal."""
        if self.prior is not None:
            return self.prior()
        return dist.Normal(self._zero, torch.ones_like(self._zero)).to_event(1)

    def posterior_dist(self, x):
        """:math:`q(z \\mid x)`: the encoder's Gaussian, pushed through the posterior flow."""
        out = self.encoder(x)
        loc, pre_scale = out[..., :self.latent_dim], out[..., self.latent_dim:2 * self.latent_dim]
        q0 = dist.Normal(loc, F.softplus(pre_scale) + 1e-4).to_event(1)
        if self.posterior is None:
            return q0
        return self.posterior(out[..., 2 * self.latent_dim:], base=q0)

    def model(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_scale):
                z = pyro.sample("z", self.prior_dist())
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.kl_scale):
            pyro.sample("z", self.posterior_dist(x))

    @torch.no_grad()
    def reconstruct(self, x):
        """Bernoulli means of :math:`p(x \\mid z)` at one posterior draw per image."""
        return torch.sigmoid(self.decoder(self.posterior_dist(x).sample()))

    @torch.no_grad()
    def sample_images(self, n: int):
        """Bernoulli means of :math:`p(x \\mid z)`, :math:`z \\sim p(z)`."""
        return torch.sigmoid(self.decoder(self.prior_dist().sample((n,))))


def binarize(x, threshold: float = 0.5):
    """Grey levels scaled to [0, 1] by their maximum, then thresholded to {0., 1.}."""
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x / x.max() > threshold).float()


def train_vae(vae: VAE, x_train, *, epochs: int, batch_size: int = 100, lr: float = 1e-3, seed: int = 0,
              kl_warmup: int = 0, val_data=None, eval_every: int = 10, log_every: int = 0,
              weight_decay: float = 0.0) -> list[float]:
    r"""Fit ``vae`` by SVI (``Trace_ELBO``, Adam) on the rows of ``x_train``; returns the
    per-epoch training loss (negative ELBO per image, with the warm-up weight).

    ``kl_warmup``: over the first ``kl_warmup`` epochs the latent terms
    :math:`\log p(z) - \log q(z \mid x)` are weighted by a factor rising
    linearly from ``1 / kl_warmup`` to 1 (Bowman et al. 2016; Sonderby et al.
    2016), which keeps small-data VAEs from collapsing onto the prior.

    With ``val_data``, every ``eval_every`` epochs the validation ELBO (20 draws per
    image) is measured and the parameters with the best one are restored at the
    end (early stopping without stopping: the budget stays ``epochs``).
    ``weight_decay``: Adam's L2 penalty on every parameter (encoder, decoder, flows)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr, "weight_decay": weight_decay}), Trace_ELBO())
    g = torch.Generator().manual_seed(seed)
    n, history, t0 = x_train.shape[0], [], time.perf_counter()
    best, best_state = -float("inf"), None
    for epoch in range(epochs):
        vae.train()
        vae.kl_scale = min(1.0, (epoch + 1) / kl_warmup) if kl_warmup else 1.0
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            total += svi.step(x_train[perm[i:i + batch_size]])
        history.append(total / n)
        if val_data is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            vae.eval()
            if vae.kl_scale < 1.0:
                continue  # only full-ELBO epochs compete for the best
            val = float(evaluate_vae(vae, val_data, num_samples=20, chunk_size=20, batch_size=len(val_data)).elbo.mean())
            if val > best:
                best, best_state = val, {k: v.clone() for k, v in vae.state_dict().items()}
        if log_every and (epoch + 1) % log_every == 0:
            print(f"  epoch {epoch + 1}: -ELBO/image {history[-1]:.3f}"
                  + (f", best val ELBO {best:.3f}" if best_state is not None else "")
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    vae.kl_scale = 1.0
    if best_state is not None:
        vae.load_state_dict(best_state)
    vae.eval()
    return history


def evaluate_vae(vae: VAE, x, *, num_samples: int = 1000, chunk_size: int = 100, batch_size: int = 100,
                 seed: int | None = None) -> IWAEResult:
    """Per-image IWAE bound and ELBO (``num_samples`` draws each) on the rows of ``x``,
    in batches of ``batch_size`` images (``seed``: reseed Pyro's RNGs first);
    ``log_weights`` is left empty."""
    if seed is not None:
        pyro.set_rng_seed(seed)
    iw, el = [], []
    for i in range(0, x.shape[0], batch_size):
        r = iwae_bounds(vae.model, vae.guide, x[i:i + batch_size], num_samples=num_samples,
                        chunk_size=chunk_size)
        iw.append(r.iwae)
        el.append(r.elbo)
    return IWAEResult(iwae=torch.cat(iw), elbo=torch.cat(el), log_weights=torch.empty(0))


def vae_demo_section(out_dir, quick: bool = True, seed: int = 0) -> dict:
    """The demo's VAE section (under a minute): Gaussian vs IAF posterior on binarised
    scikit-learn digits, scored by test ELBO and IWAE; writes ``vae_digits.png``
    (test images, reconstructions, prior samples) to ``out_dir`` when matplotlib is
    installed.  Returns ``dict(title=, rows=, text=, figures=)`` (the fields of the
    demo's ``SectionResult``)."""
    from pathlib import Path

    from ..data import load_digits

    out_dir = Path(out_dir)
    x = binarize(load_digits())
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = x[perm[:1437]], x[perm[1437:]]
    epochs, k = (15, 100) if quick else (60, 1000)
    rows, vaes = [], {}
    for kind in ("gaussian", "iaf"):
        torch.manual_seed(seed)
        vae = VAE(64, latent_dim=16, hidden_dims=(64, 64), posterior=kind)
        t0 = time.perf_counter()
        train_vae(vae, train, epochs=epochs, batch_size=128, lr=5e-3, seed=seed, kl_warmup=5)
        seconds = time.perf_counter() - t0
        r = evaluate_vae(vae, test, num_samples=k, chunk_size=min(k, 200), batch_size=360, seed=seed)
        vaes[kind] = vae
        rows.append({"posterior": kind, "epochs": epochs, "test ELBO": float(r.elbo.mean()),
                     f"test IWAE (K={k})": float(r.iwae.mean()), "seconds": seconds})
    text = (f"A VAE (latent 16, Bernoulli decoder) on binarised 8x8 digits ({train.shape[0]} train, "
            f"{test.shape[0]} test images), {epochs} epochs of Trace_ELBO. The IAF posterior is "
            "`flow(h, base=q0)`: the encoder's Gaussian pushed through IAF layers conditioned on the "
            f"encoder's context h. Nats per image (higher is better); IWAE with K = {k} importance samples "
            "(`pyroflows.infer.iwae_bound`). See docs/bench_vae.md for the full comparison.")
    figures = []
    try:
        from .. import plot

        vae = vaes["iaf"]
        torch.manual_seed(seed)
        imgs = torch.cat([test[:10], vae.reconstruct(test[:10]), vae.sample_images(10)])
        fig = plot.image_grid(imgs, nrow=10)
        fig.savefig(out_dir / "vae_digits.png", dpi=60)
        plot.close(fig)
        figures.append("vae_digits.png")
    except ImportError:
        pass
    return {"title": "A VAE with a flow posterior (digits)", "rows": rows, "text": text, "figures": figures}

