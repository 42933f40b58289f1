"""What a few hundred to a few thousand iMF steps of a 2-D MLP learn, against closed forms.

    gaussian   data N((1.5, -1), std^2 I); per seed: 1-step, 2-step and ODE (RK4, 20 steps) sample
               mean and std (the exact flow map gives mean (1.5, -1) and std `--std`).
    two-class  classes N((-2, 0), 0.25 I) and N((2, 0), 0.25 I), a guidance-conditioned model; per
               seed and class: 1-step samples at omega = 1 and 3 along the class axis (mean, std)
               and across it (std), beside the closed-form guided flow of tests/test_imf_sampling.py,
               and the fraction of the closed form's omega = 3 shift the model reaches.

Seed s: model initialised under torch.manual_seed(s), batches and loss draws from a generator seeded
s + 1, samples from noise seeded 99.  One thread, Adam with a cosine schedule, batch 256; the MLP is
tests/test_imf_sampling.py's (hidden 64, depth 2, time embedding 32, v-head 1).

    PYTHONPATH=$PWD .venv/bin/python scripts/imf_small_budget.py gaussian --seeds 0,1,2,3
    PYTHONPATH=$PWD .venv/bin/python scripts/imf_small_budget.py two-class --seeds 0,1,2,3
"""

import argparse
import time

import torch

from tests.test_imf_sampling import CLASS_MEANS, CLASS_STD, guided_samples
from zoo.config.schema import LossConfig, MLPConfig
from zoo.losses import build_loss
from zoo.models import build_model
from zoo.solvers import sample_meanflow, sample_ode
from zoo.solvers.samplers import Guidance

MEAN = torch.tensor([1.5, -1.0])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem", choices=["gaussian", "two-class"])
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=None, help="default 1000 (gaussian), 1200 (two-class)")
    p.add_argument("--lr", type=float, default=None, help="default 5e-3 (gaussian), 2e-3 (two-class)")
    p.add_argument("--beta2", type=float, default=None, help="default 0.999 (gaussian), 0.95 (two-class)")
    p.add_argument("--kind", default="imf", choices=["imf", "meanflow"], help="gaussian only")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--time-mu", type=float, default=-2.0)
    p.add_argument("--time-sigma", type=float, default=2.0)
    p.add_argument("--weight-p", type=float, default=1.0)
    p.add_argument("--weight-c", type=float, default=0.01)
    p.add_argument("--time-inputs", default="t_h", choices=["t_h", "t_r", "h"])
    p.add_argument("--std", type=float, default=0.5, help="gaussian: the data's std")
    p.add_argument("--omega-max", type=float, default=3.0, help="two-class")
    p.add_argument("--class-dropout", type=float, default=0.1, help="two-class")
    args = p.parse_args()
    gaussian = args.problem == "gaussian"
    for name, one, two in (("steps", 1000, 1200), ("lr", 5e-3, 2e-3), ("beta2", 0.999, 0.95)):
        if getattr(args, name) is None:
            setattr(args, name, one if gaussian else two)
    return args


def train(args: argparse.Namespace, seed: int, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    v_head = 0 if args.kind == "meanflow" else 1
    model_cfg = MLPConfig(
        hidden=64,
        depth=2,
        time_embed_dim=32,
        v_head=v_head,
        time_inputs=args.time_inputs,
        guidance_inputs=num_classes > 0,
    )
    model = build_model(model_cfg, (2,), num_classes)
    loss_fn = build_loss(
        LossConfig(
            kind=args.kind,
            ratio=args.ratio,
            time_mu=args.time_mu,
            time_sigma=args.time_sigma,
            weight_p=args.weight_p,
            weight_c=args.weight_c,
            omega_max=args.omega_max,
            class_dropout=args.class_dropout,
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, args.beta2))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(seed + 1)
    means = CLASS_MEANS.float()
    for _ in range(args.steps):
        if num_classes:
            y = torch.randint(0, 2, (256,), generator=gen)
            x = means[y] + CLASS_STD * torch.randn(256, 2, generator=gen)
        else:
            y, x = None, MEAN + args.std * torch.randn(256, 2, generator=gen)
        out = loss_fn(model, x, y, gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def gaussian(args: argparse.Namespace, seed: int) -> None:
    model = train(args, seed, 0)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        samples = {
            "1-step": sample_meanflow(model, noise, 1),
            "2-step": sample_meanflow(model, noise, 2),
            "ODE": sample_ode(model, noise, "rk4", 20),
        }
    row = "  ".join(
        f"{name} mean {x.mean(0).numpy().round(3)} std {x.std(0).numpy().round(3)}"
        for name, x in samples.items()
    )
    print(f"seed {seed}: {row}", flush=True)


def two_class(args: argparse.Namespace, seed: int) -> None:
    model = train(args, seed, 2)
    n = 2000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    for label in (0, 1):
        side = torch.tensor([CLASS_MEANS[label, 0].sign().item(), 1.0], dtype=torch.float64)
        y = torch.full((n,), label)
        model_x, true_x = {}, {}
        for w in (1.0, 3.0):
            with torch.no_grad():
                model_x[w] = side * sample_meanflow(model, noise.float(), 1, y, Guidance(w)).double()
            true_x[w] = side * guided_samples(noise, label, w)
            m, t = model_x[w], true_x[w]
            print(
                f"seed {seed} class {label} omega {w:g}: model along mean {m[:, 0].mean():.3f} "
                f"std {m[:, 0].std():.3f} across std {m[:, 1].std():.3f} | closed form along mean "
                f"{t[:, 0].mean():.3f} std {t[:, 0].std():.3f} across std {t[:, 1].std():.3f}"
            )
        shift = model_x[3.0][:, 0].mean() - model_x[1.0][:, 0].mean()
        true_shift = true_x[3.0][:, 0].mean() - true_x[1.0][:, 0].mean()
        narrowing = model_x[3.0][:, 0].std() / model_x[1.0][:, 0].std()
        true_narrowing = true_x[3.0][:, 0].std() / true_x[1.0][:, 0].std()
        print(
            f"  shift {shift:.3f} of {true_shift:.3f} ({shift / true_shift:.2f}); along-axis std ratio "
            f"{narrowing:.2f} (closed form {true_narrowing:.2f}); across-axis std ratio "
            f"{model_x[3.0][:, 1].std() / model_x[1.0][:, 1].std():.2f} (closed form 1.00)",
            flush=True,
        )


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.process_time()
        (gaussian if args.problem == "gaussian" else two_class)(args, seed)
        print(f"  ({time.process_time() - start:.1f} s of CPU)", flush=True)


if __name__ == "__main__":
    main()
