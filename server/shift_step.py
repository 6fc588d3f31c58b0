"""A server-side step for the response shifts alone: ``federation.shift-server-lr`` and
``federation.shift-server-momentum``.

After a round's aggregate, with ``old`` the global weights the round started from and
``d = aggregate - old`` on the response shifts (``common.model.response_shift_weights``:
the ``activation_shift`` kernel and bias), the velocity becomes ``v = momentum * v + d``
and the shifts ``old + rate * v``; every other weight is the aggregate as it is. A FedAvg
round moves the shifts as far as a few dozen steps of one merchant, against hundreds in
centralised training, and the global shifts can still be being fitted when the rounds
end (README, *How the LSTM learns activation*). The velocity is the only state; the
server keeps it in its checkpoints (``server.checkpoint.strategy_state``). At rate 1 and
momentum 0 the aggregate is returned unchanged, bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: The strategy attribute that holds the velocity (checkpointed, restored on resume).
VELOCITY = "shift_velocity"


@dataclasses.dataclass(frozen=True)
class ShiftStep:
    """The server step of the response shifts: their positions in the weight list, the
    rate (1: the aggregate as it is) and the momentum (0: none)."""

    positions: tuple[int, ...] = ()
    rate: float = 1.0
    momentum: float = 0.0

    @property
    def active(self) -> bool:
        """Whether the step changes anything (shifts to step, and a rate other than 1 or
        some momentum)."""
        return (self.rate != 1.0 or self.momentum != 0.0) and bool(self.positions)

    def apply(self, old: list[np.ndarray], new: list[np.ndarray],
              velocity: list[np.ndarray] | None = None
              ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """``new`` with each shift weight at ``old + rate * v``, ``v = momentum *
        velocity + (new - old)`` (``velocity`` None: zeros), in ``new``'s dtype; and the
        new velocity (one array a shift weight). ``new`` and ``velocity`` themselves
        when the step is not :attr:`active`."""
        if not self.active:
            return new, velocity
        if len(old) != len(new):
            raise ValueError(f"the round started from {len(old)} weight tensors and its "
                             f"aggregate has {len(new)}")
        out = list(new)
        moved = []
        for k, i in enumerate(self.positions):
            v = new[i].astype(np.float64) - old[i]
            if velocity is not None and self.momentum:
                v = self.momentum * velocity[k] + v
            moved.append(v)
            out[i] = (old[i] + self.rate * v).astype(new[i].dtype)
        return out, moved


    def misfit(self, velocity: list[np.ndarray], weights: list[np.ndarray]) -> str | None:
        """Why a checkpoint's ``velocity`` cannot go with these shift positions and the
        checkpoint's ``weights`` (count, shape or dtype), or None when it fits."""
        if len(velocity) != len(self.positions):
            return (f"it holds {len(velocity)} shift velocity arrays for the "
                    f"{len(self.positions)} response-shift weights of this model")
        for k, i in enumerate(self.positions):
            v = np.asarray(velocity[k])
            if v.shape != np.shape(weights[i]) or v.dtype.kind != "f":
                return (f"shift velocity array {k} is {v.dtype} {v.shape}, its weight "
                        f"(array {i}) {np.shape(weights[i])}")
        return None


#: The step that changes nothing (rate 1, no momentum).
NO_STEP = ShiftStep()
