"""A discrete-event simulator of the generation stage that drives the real strategy and reallocation code."""

from rlhfspec.sim.ablation import SimConfig, ablation
from rlhfspec.sim.cost import RooflineCost, StepCost, TableCost
from rlhfspec.sim.hardware import ACCELERATORS, Roofline, Shape, accelerator, model_config
from rlhfspec.sim.run import Cluster, SimRun, Workload, simulate
from rlhfspec.sim.workload import AcceptanceProfile

__all__ = [
    "ACCELERATORS", "AcceptanceProfile", "Cluster", "Roofline", "RooflineCost", "Shape", "SimConfig", "SimRun", "StepCost",
    "TableCost", "Workload", "ablation", "accelerator", "model_config", "simulate",
]
