"""Train a spiking network with fxmemopt: optimize once, then train exactly as before.

    python examples/train_snn.py

Random data stands in for a dataset (no downloads). The optimized module shares its parameters with the model,
so the optimizer is built on ``model.parameters()`` and checkpoints saved from either are interchangeable.
"""

import torch
import torch.nn.functional as F

import fxmemopt
from fxmemopt.snn import DeepConvSNN, reset_net

torch.manual_seed(0)
T, N = 4, 8
model = DeepConvSNN(num_blocks=6, channels=16, num_classes=10)
x = torch.rand(T, N, 3, 16, 16)
gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
print(summary)

optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(5):
    images = torch.rand(T, N, 3, 16, 16)
    labels = torch.randint(0, 10, (N,))
    logits = gm(images).mean(0)  # average over time steps
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    reset_net(gm)  # neuron state is shared with `model`: reset either one
    print(f"step {step}: loss {loss.item():.4f}")

assert gm.state_dict().keys() == model.state_dict().keys()
torch.save(model.state_dict(), "/tmp/fxmemopt_example.pt")  # loads into the unoptimized model as well
