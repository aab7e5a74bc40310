"""The distillation fine-tune of a fused model (workers/align/finetune.py)."""

import copy

import torch
from torch.nn import functional as F

from tests.unit.test_align_spec import model_state
from workers.align.finetune import _kl, distill


def _teachers_and_inputs():
    torch.manual_seed(1)
    parent, _, _ = model_state("vit")
    for p in parent.parameters():
        p.data += 0.5 * torch.randn_like(p)
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return parent(pixel_values=x).logits, x


def test_distillation_lowers_the_loss_keeps_heads_and_repeats_bit_for_bit():
    teacher, x = _teachers_and_inputs()
    student, _, _ = model_state("vit")
    head = {n: p.detach().clone() for n, p in student.named_parameters()
            if n.startswith("classifier.")}
    runs = []
    for _ in range(2):
        model = copy.deepcopy(student)
        losses = distill(model, [teacher], [head], x, "pixel_values", steps=40, lr=1e-2,
                         batch_size=8, seed=3)
        runs.append((model, losses))
    (model, _), (again, _) = runs

    def distance(m):  # on all the inputs
        with torch.no_grad():
            return float(_kl(m(pixel_values=x).logits, F.softmax(teacher.double(), -1)))

    assert distance(model) < 0.85 * distance(student)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in head.items())
    assert not torch.equal(model.vit.embeddings.cls_token, student.vit.embeddings.cls_token)


def test_a_student_equal_to_its_parent_has_nothing_to_learn():
    student, _, _ = model_state("vit")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        teacher = student(pixel_values=x).logits
    losses = distill(copy.deepcopy(student), [teacher, teacher], [], x, "pixel_values",
                     steps=3, lr=1e-3, batch_size=8, seed=0)
    assert max(losses) < 1e-10
