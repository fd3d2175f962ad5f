"""Space (b), layers to drop: which ``count`` layers of the base to remove, decoded into the recipe ``splice skip`` writes.

A candidate is ``{"drop": [i, j, ...]}``, the sorted layer indices removed (always
``count`` of them). ``space.drop: {count: K}`` fixes K; ``space.drop: {speedup: X}`` takes
the smallest K that reaches a predicted decode speed-up of X by splice skip's cost model
(with the largest layers dropped first; in a model whose layers are all the same size, as
in every family splice knows, any K layers predict the same).

The decoded recipe is :func:`splice.skip.recipe_for` of the plan, the ``passthrough``
recipe that ``splice skip ... -o`` writes through the merge engine, so ``splice merge
study/best.yaml -o pruned/`` writes exactly the model that was scored. A candidate is
scored without writing anything: its layers are bypassed in the resident base model
(:func:`splice.skip.skipping`), which computes the same as the pruned model.

Torch-free.
"""

from __future__ import annotations

from ..skip.costs import LayerCosts
from ..skip.strategies import STRATEGIES, SkipPlan, count_for, make_plan
from .optimizers import SearchError
from .space import Gene
from .spec import SearchSpec

SEED_STRATEGIES = ("balanced", "block-influence", "angular")  # splice skip's planners that drop whole layers (ffn drops MLP blocks)


class DropSpace:
    """The layer-drop space of a spec over the base's cost model (``splice.skip.layer_costs``)."""

    kind = "drop"

    def __init__(self, spec: SearchSpec, costs: LayerCosts):
        self.spec = spec
        self.costs = costs
        self.n_layers = L = costs.num_layers
        d = spec.space.drop
        if d["count"] is not None:
            if d["count"] > L - 1:
                raise SearchError(f"space.drop.count {d['count']}: the base has {L} layers; at most {L - 1} can be dropped")
            self.count = d["count"]
        else:
            largest = sorted(range(L), key=lambda i: (-costs.layer[i], i))
            try:
                self.count = count_for(costs, "layer", lambda k: largest[:k], drop=None, ratio=None, speedup=d["speedup"])
            except Exception as e:  # noqa: BLE001 - the cost model's one-line reason
                raise SearchError(f"space.drop.speedup {d['speedup']}: {e}") from None
            if self.count == 0:
                raise SearchError(f"space.drop.speedup {d['speedup']}: nothing needs dropping for it")
        self.methods: dict = {}
        self.seeds: list[tuple[str, list[int]]] = []  # (planner, its drop set), set by seed_from_planners

    def describe(self) -> str:
        return f"drop {self.count} of {self.n_layers} layers"

    def label(self, params: dict) -> str:
        return "drop " + ",".join(str(i) for i in params["drop"])

    def all_genes(self) -> list[Gene]:
        return [Gene(f"drop#{j}", "categorical", choices=tuple(range(self.n_layers))) for j in range(self.count)]

    def propose(self, suggest, method=None) -> dict:
        """A uniform random drop set when ``suggest`` draws uniformly: ``count`` draws without replacement."""
        left = list(range(self.n_layers))
        chosen = []
        for j in range(self.count):
            i = suggest(Gene(f"drop#{j}", "categorical", choices=tuple(left)))
            left.remove(i)
            chosen.append(i)
        return {"drop": sorted(chosen)}

    def plan(self, drop: list[int], strategy: str = "search") -> SkipPlan:
        """The ``SkipPlan`` that drops these layers of the base."""
        c = self.costs
        return SkipPlan(
            model=self.spec.base,
            strategy=strategy,
            num_layers=self.n_layers,
            drop_layers=sorted(drop),
            drop_mlp=[],
            scores={},
            score_name="",
            params_total=c.total_params,
            params_after=c.params_without(drop),
            compute_total=c.compute_total,
            compute_after=c.compute_without(drop),
        )

    def decode(self, params: dict) -> dict:
        """The passthrough recipe ``splice skip`` writes for this drop set (``splice merge`` runs it)."""
        from ..skip.pruning import recipe_for

        return recipe_for(self.plan(params["drop"]), self.costs.mlp_output)

    def seed_from_planners(self, stats) -> None:
        """Each of splice skip's layer planners' choice of ``count`` layers (``stats``: hidden-state statistics of the base)."""
        self.seeds = []
        for name in SEED_STRATEGIES:
            s = STRATEGIES.get(name)
            if s.needs_data and stats is None:
                continue
            try:
                p = make_plan(self.costs, name, stats, model=self.spec.base, drop=self.count)
            except Exception:  # noqa: BLE001 - a planner that cannot plan this model (balanced on < 3 layers) seeds nothing
                continue
            self.seeds.append((name, p.drop_layers))

    def baselines(self) -> list[tuple[str, dict]]:
        """The planners' drop sets, for the leaderboard."""
        return [(f"splice skip {name}", {"drop": d}) for name, d in self.seeds]
