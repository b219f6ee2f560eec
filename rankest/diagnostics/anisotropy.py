from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from rankest.accumulate.anisotropy import Anisotropy
from rankest.errors import UserError
from rankest.sources.corpus import iter_batches


# ---- anisotropy of a loaded teacher ---------------------------------------------------------
def teacher_anisotropy(teacher, windows: torch.Tensor, plan, *, batch_size: int = 8, pca: bool = True,
                       quiet: bool = False, desc: str = "anisotropy") -> dict[str, Any]:
    """Run the teacher over the planned rows and return :meth:`Anisotropy.finalize` plus
    ``last_is_head_input`` (whether the last representation equals the head's input)."""
    acc: Optional[Anisotropy] = None
    last_is_head_input = None
    bar = tqdm(total=plan.n_rows, unit="tok", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in iter_batches(windows, plan, batch_size):
            ids = batch.input_ids.to(teacher.device)
            features, layers = teacher.hidden_states(ids)
            mask = batch.mask.to(teacher.device)
            if acc is None:
                acc = Anisotropy([h.shape[-1] for h in layers], pca=pca, device=teacher.device)
                last_is_head_input = bool(torch.equal(layers[-1], features))
            acc.update([h[mask] for h in layers])
            bar.update(int(mask.sum()))
    bar.close()
    if acc is None:
        raise UserError("the corpus gave no rows for the anisotropy; raise --tokens or use a bigger corpus")
    out: dict[str, Any] = acc.finalize()
    out["last_is_head_input"] = last_is_head_input
    return out
