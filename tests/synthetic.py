"""Synthetic cost models and fleets: planner and clock tests without a model."""

from __future__ import annotations

import math

from splitft.sim.costs import CostModel
from splitft.sim.predict import Workload, World
from splitft.sim.profiles import Device, ServerDevice

MB = 1e6


def costs(
    num_layers: int = 30, head_blocks: float = 7.0, block_s: float = 1e-4
) -> CostModel:
    """Round numbers shaped like SmolLM2-135M's probe: 1e-4 s per block and slot."""
    return CostModel(
        num_layers=num_layers,
        hidden_size=576,
        embed_s=0.0,
        block_s=block_s,
        norm_s=0.0,
        head_s=head_blocks * block_s,
        forward_share=0.5,
        embed_bytes=113 * MB,
        block_bytes=14 * MB,
        head_bytes=0.0,
        lora_block_bytes=1.3 * MB,
        act_embed=0.0,
        act_block=40e3,
        act_norm=0.0,
        act_head=200e3,
        message_bytes=100,
        smashed_slot_bytes=2330,
        gradient_slot_bytes=2305,
        adapter_block_bytes=327e3,
        adapter_cut_bytes=164e3,
        load_block_s=0.003,
        codec_s_per_byte=0.0,
    )


def device(slowdown=1.0, memory_mb=0.0, up=100.0, down=100.0, rtt_ms=10.0, name="d"):
    return Device(
        name,
        slowdown,
        memory_mb * MB if memory_mb else math.inf,
        up * 1e6,
        down * 1e6,
        rtt_ms / 1e3,
    )


def world(
    devices: dict[int, Device],
    speed: float = 1.0,
    workers: int = 1,
    steps: int = 4,
    slots: float = 256,
    worst: int = 768,
    num_layers: int = 30,
) -> World:
    # every slot labelled: the head costs head_blocks blocks a slot
    workload = Workload(
        steps, 1, dict.fromkeys(devices, slots), dict.fromkeys(devices, slots), worst
    )
    return World.of(costs(num_layers), devices, ServerDevice(speed, workers), workload)
