"""Layers in PyTorch style (NCHW, ``weight``/``bias`` Parameters) with explicit backward passes."""
from gpucnn.nn.activation import Dropout, ReLU, Sigmoid, Tanh
from gpucnn.nn.conv import Conv2d
from gpucnn.grad_mode import is_grad_enabled, no_grad
from gpucnn.nn.linear import Flatten, Linear
from gpucnn.nn.module import IncompatibleKeys, Module, Parameter, Sequential
from gpucnn.nn.norm import BatchNorm1d, BatchNorm2d
from gpucnn.nn.pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from gpucnn.nn.residual import BasicBlock, Residual

__all__ = [
    "Module", "Parameter", "Sequential", "IncompatibleKeys",
    "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Linear", "Flatten",
    "BatchNorm1d", "BatchNorm2d", "Residual", "BasicBlock",
    "ReLU", "Tanh", "Sigmoid", "Dropout",
    "no_grad", "is_grad_enabled",
]
