"""Per-block proof: the block cut out of the original as its own model (cut), run beside its replacement on
hard inputs (cases) in worker processes (worker), compared case by case (protocol)."""

from moe_fusion.proof.cut import BlockCut, block_nodes, cut
from moe_fusion.proof.protocol import Pending, Proof, begin, cancel, finish, prove
from moe_fusion.proof.worker import start_workers

__all__ = ["BlockCut", "Pending", "Proof", "begin", "block_nodes", "cancel", "cut", "finish", "prove", "start_workers"]
