"""MCTS-Explore seed selection, as described for GPTFuzz (Yu et al. 2023), written for lmdistill.

The seed templates hang under a root. ``select`` walks down from the root, at each level taking the child
with the best UCT score ``mean reward + ratio * sqrt(2 ln(N_parent + 1) / (n + 1))`` (ties broken by the
seeded random generator), and stops early at a non-leaf with probability ``alpha``, so inner templates
keep being mutated. ``update`` adds the reward to every node on the walked path, scaled by
``max(beta, 1 - 0.1 * depth)`` of the selected node, so deep lineages cannot take all the credit.
A mutant that scored at least one hit becomes a child of the template it came from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Node:
    id: int
    template: str
    depth: int
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    reward: float = 0.0


class MCTSExplore:
    def __init__(self, seeds: list[str], *, ratio: float = 0.5, alpha: float = 0.1, beta: float = 0.2,
                 rng: random.Random | None = None):
        if not seeds:
            raise ValueError("MCTS-Explore needs at least one seed template")
        self.ratio, self.alpha, self.beta = ratio, alpha, beta
        self.rng = rng or random.Random(0)
        self.root = Node(-1, "", -1)
        self.nodes: list[Node] = []
        for s in seeds:
            self._new(s, self.root)

    def _new(self, template: str, parent: Node) -> Node:
        node = Node(len(self.nodes), template, parent.depth + 1, parent)
        parent.children.append(node)
        self.nodes.append(node)
        return node

    def _uct(self, child: Node, parent: Node) -> float:
        return (child.reward / (child.visits + 1)
                + self.ratio * math.sqrt(2 * math.log(parent.visits + 1) / (child.visits + 1)))

    def select(self) -> tuple[Node, list[Node]]:
        path: list[Node] = []
        current = self.root
        while current.children:
            scores = [self._uct(c, current) for c in current.children]
            best = max(scores)
            ties = [c for c, s in zip(current.children, scores) if s >= best - 1e-12]
            current = ties[self.rng.randrange(len(ties))]
            path.append(current)
            if current.children and self.rng.random() < self.alpha:
                break
        return current, path

    def update(self, path: list[Node], reward: float) -> None:
        if not path:
            return
        scale = max(self.beta, 1 - 0.1 * path[-1].depth)
        self.root.visits += 1
        for node in path:
            node.visits += 1
            node.reward += reward * scale

    def add(self, parent: Node, template: str) -> Node:
        return self._new(template, parent)
