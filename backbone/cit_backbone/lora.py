"""The one owner of the LM's LoRA adapters (PEFT): their names, the serving slots, which are being trained, and
which LoRA each row of a forward pass runs through. The trainer, the adapter cache and the running batch use this
API only; nothing else touches PEFT's state.

Callers' names (task ids, versions) may hold characters PEFT cannot use in module names ("." or "training"), so
each LoRA gets an internal name of its own.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

BASE_ROWS = "__base__"  # PEFT's name for "no LoRA" in a mixed batch
DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoraManager:
    def __init__(self, model: torch.nn.Module, base_model_name: str,
                 on_change: Callable[[str], None] = lambda name: None) -> None:
        self.model = model                    # the causal LM; PEFT injects the LoRA layers into it in place
        self.base_model_name = base_model_name  # written into saved configs
        self._on_change = on_change           # a LoRA's weights change (training on/off, unloaded): its name
        self.peft: Any = None                 # peft.PeftModel around `model`, created when the first LoRA arrives
        self._layers: list[Any] = []          # PEFT's LoRA layers, found once per injection
        self._names: dict[str, str] = {}      # LoRA name -> PEFT's adapter name
        self._counter = itertools.count()
        self._training: set[str] = set()      # LoRAs being trained: their prefixes change every step, never cached
        self._slot_config: Any = None         # serving: the shape of the LoRA slots (see `slots`)
        self._slot_count = 0                  # slots wanted
        self._free_slots: list[str] = []      # injected and unused
        self._slots_made = 0
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._stacks: list[SlotStack] = []    # per LoRA layer: every slot's A and B in one tensor (batched rows)

    def _config(self, rank: int, alpha: int, targets: Sequence[str]):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                          base_model_name_or_path=self.base_model_name, task_type="CAUSAL_LM")

    def _inject(self, internal: str, config) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel(self.model, config, adapter_name=internal)
        else:
            self.peft.add_adapter(internal, config)

    def add(self, name: str, rank: int = 8, alpha: int = 16, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
        """A new trainable LoRA (B = 0, so it starts as the frozen LM)."""
        self._inject(self._new_name(name), self._config(rank, alpha, targets))
        self._training.add(name)
        self._settle()

    def slots(self, count: int, rank: int = 8, alpha: int = 16, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
        """Serving: keep `count` LoRAs of this shape injected (vLLM's slots). Loading a LoRA of the same shape then
        copies its weights into a free slot (milliseconds) instead of building its modules; unloading frees the
        slot. The slots are injected at the first load, so a server without LoRA tasks never pays for them."""
        if self._slots_made and (rank, alpha, set(targets)) != (self._slot_config.r, self._slot_config.lora_alpha,
                                                                set(self._slot_config.target_modules)):
            raise ValueError("LoRA slots of another shape exist already")
        self._slot_count = max(count, self._slots_made)
        self._slot_config = self._config(rank, alpha, targets)

    def _fits_slot(self, directory: Path) -> bool:
        from peft import LoraConfig

        if self._slot_config is None:
            return False
        config, slot = LoraConfig.from_pretrained(str(directory)), self._slot_config
        return (config.r, config.lora_alpha, set(config.target_modules), config.use_rslora, config.use_dora,
                config.bias) == (slot.r, slot.lora_alpha, set(slot.target_modules), False, False, "none")

    def read(self, directory: Path) -> dict[str, torch.Tensor] | None:
        """A saved LoRA's weights, when it fits the slots (else None: PEFT reads it at load). Changes nothing, so a
        loader thread can read ahead of `load`."""
        from safetensors.torch import load_file

        return load_file(str(directory / "adapter_model.safetensors")) if self._fits_slot(directory) else None

    def _load_into_slot(self, name: str, directory: Path, weights: dict[str, torch.Tensor] | None) -> bool:
        """Copy a LoRA (its weights, read from `directory` unless given) into a free slot; False when none is free."""
        from safetensors.torch import load_file

        if self._slots_made < self._slot_count:  # first use (or more slots asked for): inject them once
            for i in range(self._slots_made, self._slot_count):
                self._inject(f"slot{i}", self._slot_config)
                self._free_slots.append(f"slot{i}")
            self._slots_made = self._slot_count
            self._settle()
            self._stack_slots()
        if not self._free_slots:
            return False
        internal = self._free_slots.pop()  # the most recently freed first
        params = self._slot_parameters(internal)
        if weights is None:
            weights = load_file(str(directory / "adapter_model.safetensors"))
        if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in weights):
            self._free_slots.append(internal)
            raise ValueError(f"{directory}: its weights do not match the LoRA modules of this LM")
        with torch.no_grad():  # a copy per tensor: no module is built, no state dict of the whole model walked
            for key, value in weights.items():
                params[key].copy_(value)
        self._names[name] = internal
        return True

    def _stack_slots(self) -> None:
        """Each LoRA layer's slot weights as one tensor per matrix, [slots, r, in] and [slots, out, r], whose rows
        the slots' own parameters become views of: a LoRA copied into its slot is in the stack at once, and a batch
        of rows through different slot LoRAs runs as one gather and two batched matmuls per layer (the S-LoRA /
        Punica way) instead of PEFT's loop over the adapters in the batch."""
        self._stacks = []
        for layer in self._layers:
            if "slot0" not in layer.lora_A:
                continue
            stacks = []
            for matrices in (layer.lora_A, layer.lora_B):
                stack = torch.stack([matrices[f"slot{i}"].weight.detach() for i in range(self._slots_made)])
                for i in range(self._slots_made):
                    matrices[f"slot{i}"].weight = torch.nn.Parameter(stack[i], requires_grad=False)
                stacks.append(stack)
            self._stacks.append(SlotStack(layer, stacks[0], stacks[1], float(layer.scaling["slot0"])))
        self._slot_params.clear()  # the parameters were replaced by views: look them up again

    def _slot_parameters(self, internal: str) -> dict[str, torch.nn.Parameter]:
        """A slot's parameters by the names they have in a saved LoRA (PEFT's names without the adapter's)."""
        if internal not in self._slot_params:
            self._slot_params[internal] = {n.replace(f".{internal}.", "."): p for n, p in self.peft.named_parameters()
                                           if f".{internal}." in n}
        return self._slot_params[internal]

    def load(self, name: str, directory: Path, trainable: bool = False,
             weights: dict[str, torch.Tensor] | None = None) -> None:
        """Load a LoRA saved in PEFT's format (by `save`, or by PEFT itself); `weights`: read ahead by `read`."""
        from peft import PeftModel

        if name in self._names:
            raise ValueError(f"a LoRA named {name!r} is loaded already")
        fits = weights is not None or self._fits_slot(directory)  # weights read ahead fit (`read` checked)
        if not trainable and fits and self._load_into_slot(name, directory, weights):
            return
        only_safetensors(Path(directory))  # PEFT's own loader reads the directory from here on
        internal = self._new_name(name)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(directory), adapter_name=internal)
        else:
            self.peft.load_adapter(str(directory), adapter_name=internal)
        if trainable:
            self._training.add(name)
        self._settle()

    def save(self, name: str, directory: Path) -> None:
        """PEFT's own on-disk format: `PeftModel.from_pretrained(lm, directory)` (and vLLM) load it as is."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        internal = self.adapter_name(name)
        directory.mkdir(parents=True, exist_ok=True)
        replace(self.peft.peft_config[internal], inference_mode=True).save_pretrained(str(directory))
        weights = get_peft_model_state_dict(self.peft, adapter_name=internal, save_embedding_layers=False)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(directory / "adapter_model.safetensors"))

    def set_trainable(self, name: str, trainable: bool) -> None:
        self.adapter_name(name)
        (self._training.add if trainable else self._training.discard)(name)
        self._on_change(name)
        self._settle()

    def training(self, name: str | None) -> bool:
        """Whether LoRA `name` is being trained (its outputs change from one step to the next)."""
        return name in self._training

    def unload(self, name: str) -> None:
        internal = self._names.pop(name)
        if internal.startswith("slot"):
            self._free_slots.append(internal)  # its weights stay until the next load overwrites them: no row uses it
        else:
            with warnings.catch_warnings():  # PEFT warns that the deleted adapter was "active"; rows never use that
                warnings.simplefilter("ignore")
                self.peft.delete_adapter(internal)
        self._training.discard(name)
        self._on_change(name)

    def names(self) -> list[str]:
        return list(self._names)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        internal = self.adapter_name(name)
        return [p for n, p in self.model.named_parameters() if f".{internal}." in n and "lora_" in n]

    def _new_name(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"a LoRA named {name!r} is loaded already")
        self._names[name] = f"lora{next(self._counter)}"
        return self._names[name]

    def adapter_name(self, name: str) -> str:
        """PEFT's adapter name for LoRA `name` (a slot's while it is copied into one)."""
        if name not in self._names:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._names)})")
        return self._names[name]

    def _settle(self) -> None:
        """PEFT marks adapters trainable as it adds them; only the LoRAs being trained may be."""
        from peft.tuners.lora import LoraLayer

        training = {f".{self._names[n]}." for n in self._training}
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n and any(t in n for t in training))
        self.peft.eval()  # PEFT refuses per-row adapter names in training mode; there is no dropout anyway
        self._layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]

    def rows(self, loras: Sequence[str | None]) -> AbstractContextManager[None]:
        """Context in which row i of the next forward passes uses LoRA loras[i] (None: the plain LM)."""
        if self.peft is None:
            if any(loras):
                raise ValueError(f"no LoRA is loaded, but rows ask for {sorted({n for n in loras if n})}")
            return nullcontext()
        internal = [self.adapter_name(n) if n else BASE_ROWS for n in loras]
        if self._stacks and any(loras) and all(n == BASE_ROWS or n.startswith("slot") for n in internal):
            return self._batched([int(n[4:]) if n != BASE_ROWS else -1 for n in internal])
        return self._adapter_names(internal)

    @contextmanager
    def _batched(self, slot_of_row: list[int]) -> Iterator[None]:
        """Rows whose LoRAs all sit in slots: PEFT computes the base layer only (every row named BASE_ROWS), and a
        hook adds each row's LoRA from the slot stacks, for all LoRA rows of a layer at once."""
        slots = torch.tensor(slot_of_row, device=self._stacks[0].a.device)
        lora_rows = (slots >= 0).nonzero().squeeze(1)
        every = len(lora_rows) == len(slots)  # no base row: no rows to pick out or put back
        slots = slots[lora_rows]

        def add_loras(stack: SlotStack):
            def hook(module, args, output):
                x = (args[0] if every else args[0][lora_rows]).to(stack.a.dtype)  # PEFT keeps LoRAs in fp32
                a, b = stack.a[slots], stack.b[slots]  # [rows, r, in], [rows, out, r]
                delta = (torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * stack.scaling).to(output.dtype)
                return output + delta if every else output.index_add(0, lora_rows, delta)
            return hook

        handles = [stack.layer.register_forward_hook(add_loras(stack)) for stack in self._stacks]
        with self._adapter_names([BASE_ROWS] * len(slot_of_row)):
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @contextmanager
    def _adapter_names(self, names: list[str]) -> Iterator[None]:
        """What PeftModel.forward does with `adapter_names` (each LoRA layer gets them as a keyword), for the bare
        decoder too (the trainer runs it without the LM head), and with the layers found once: PEFT walks the whole
        module tree twice per forward pass to find them (18 ms of a ~130 ms decode step here, slots injected)."""
        def pass_names(module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [layer.register_forward_pre_hook(pass_names, with_kwargs=True) for layer in self._layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class SlotStack:
    """One LoRA layer's slots: A [slots, r, in], B [slots, out, r] and the scaling they share (one shape)."""

    layer: torch.nn.Module
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def only_safetensors(directory: Path) -> None:
    """PEFT's loader falls back to a pickled adapter_model.bin when there is no adapter_model.safetensors:
    unpickling runs code, so such a directory is refused before PEFT sees it."""
    pickled = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"))
    if pickled or not (directory / "adapter_model.safetensors").is_file():
        raise ValueError(f"{directory}: a LoRA is read from adapter_model.safetensors only"
                         + (f"; refusing pickled files {', '.join(pickled)}" if pickled else ""))
