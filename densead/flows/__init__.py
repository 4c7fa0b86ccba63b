"""The flow core: invertible layers with per-position log-dets, Glow, feature flow."""

from densead.flows.base import FlowLayer, FlowSequence
from densead.flows.feature_flow import FeatureFlow
from densead.flows.glow import Glow, GlowOutput, flow_step, spread_to_input_grid
from densead.flows.layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze, glow_coupling_net
from densead.flows.prior import GaussianPrior

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FeatureFlow",
    "FlowLayer",
    "FlowSequence",
    "GaussianPrior",
    "Glow",
    "GlowOutput",
    "InvConv1x1",
    "Squeeze",
    "flow_step",
    "glow_coupling_net",
    "spread_to_input_grid",
]
