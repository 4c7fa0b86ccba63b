"""The flow core: invertible layers with per-position log-dets, Glow, feature flow."""

from densead.flows.base import FlowLayer, FlowSequence
from densead.flows.fast import (
    FastPath,
    FastTraining,
    GraphedCall,
    apply_fast_path,
    compile_flow_steps,
    needs_data_init,
    resolve_fast_path,
)
from densead.flows.feature_flow import FeatureFlow
from densead.flows.glow import (
    FlowStep,
    FlowSteps,
    Glow,
    GlowOutput,
    flow_step,
    set_fused,
    set_recompute,
    spread_to_input_grid,
)
from densead.flows.layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze, glow_coupling_net
from densead.flows.prior import GaussianPrior

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FastPath",
    "FastTraining",
    "GraphedCall",
    "FeatureFlow",
    "FlowLayer",
    "FlowSequence",
    "FlowStep",
    "FlowSteps",
    "GaussianPrior",
    "Glow",
    "GlowOutput",
    "InvConv1x1",
    "Squeeze",
    "apply_fast_path",
    "compile_flow_steps",
    "flow_step",
    "glow_coupling_net",
    "needs_data_init",
    "resolve_fast_path",
    "set_fused",
    "set_recompute",
    "spread_to_input_grid",
]
