"""Representation quality of a frozen encoder: kNN (k=20, cosine) and a linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images_u8: torch.Tensor, mean: tuple[float, ...],
                     std: tuple[float, ...], batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Pooled features [N, D] of uint8 images [N, 3, S, S] (already at the model's input size)."""
    was_training = encoder.training
    encoder.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    out = [encoder((images_u8[i:i + batch_size].to(device).float() / 255 - m) / s).float().cpu()
           for i in range(0, len(images_u8), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


def knn_correct(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Per test image [N] bool: is the weighted kNN on cosine similarity right (Wu et al. 2018 / DINO: each
    of the k nearest training features votes for its class with weight exp(sim / temperature))."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    out = []
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(len(sim), n_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes.argmax(1) == test_y[i:i + chunk])
    return torch.cat(out)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Accuracy of ``knn_correct``."""
    return knn_correct(train_f, train_y, test_f, test_y, k, temperature, chunk).sum().item() / len(test_f)


def linear_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Accuracy of ``linear_probe_correct``."""
    return linear_probe_correct(train_f, train_y, test_f, test_y, weight_decay, max_iter).float().mean().item()


def linear_probe_correct(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                         test_y: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """Per test image [N] bool: is a multinomial logistic regression on standardised frozen features
    (full-batch L-BFGS from zero weights: deterministic, no learning rate to tune) right."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(xtr.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(xtr), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return linear(xte).argmax(1) == test_y
