"""Per-dataset prompt templates of the reference implementations, keyed by vlm_adapt's dataset names.

The data configs (`conf/data/*.yaml`) carry CoOp's templates (`prompt_templates: dataset`). Some papers'
code uses its own: Skip Tuning's `trainers/baselines/ft_clip.py` differs from CoOp's on 8 of the 11 datasets
and on ImageNet-Sketch, -A and -R, CLIPFit's on DTD, ProGrad's on 5 (Pets, Flowers, Aircraft, DTD, Food101),
TCP's class knowledge on 3 (Aircraft, DTD, Food101: `tcp`), and CLIP-LoRA prompts all 11 with "a photo of a
{}." (VPT's reference every dataset, the ImageNet variants too: `photo`). `prompt_templates=<set>` applies a
set to the training dataset and to every cross-dataset / domain-generalization target; a dataset the set
does not list keeps its config's template.
"""

from __future__ import annotations

from vlm_adapt.errors import ConfigError

SKIP_TUNING = {
    "imagenet": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a sketch of a {}.",
    "imagenet_a": "a bad photo of a {}.",
    "imagenet_r": "a rendition of a {}.",
    "caltech101": "itap of a {}.",
    "dtd": "itap of a {}.",
    "eurosat": "a centered satellite photo of {}.",
    "fgvc_aircraft": "a bright photo of a {}, a type of aircraft.",
    "food101": "a photo of the nice {}.",
    "oxford_flowers": "a close-up photo of a {}.",
    "oxford_pets": "a bad photo of a {}, a type of pet.",
    "sun397": "a photo of a {}.",
    "stanford_cars": "a photo of the {}, a type of car.",
    "ucf101": "a photo of a {}, a type of sport.",
}

# minglllli/CLIPFit trainers/ClipFit.py: CoOp's templates (the data configs') except DTD
CLIPFIT = {"dtd": "a photo of a {}, a type of texture."}

# MaxZanella/CLIP-LoRA datasets/*.py: every dataset's `template` is "a photo of a {}." (the dataset-specific
# ones are commented out), and lora.py prompts with template[0] in training and test
CLIP_LORA = {name: "a photo of a {}." for name in (
    "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet", "oxford_flowers", "oxford_pets",
    "stanford_cars", "sun397", "ucf101",
)}

# ImageNet and its variants prompted with "a photo of a {}." (VPT's, ProGrad's and TCP's tables)
IMAGENETS_PHOTO = {name: "a photo of a {}." for name in (
    "imagenet", "imagenet_sketch", "imagenet_v2", "imagenet_a", "imagenet_r",
)}

# muzairkhattak/multimodal-prompt-learning trainers/vpt.py: VPT's frozen text side prompts every dataset, the
# ImageNet variants included, with "a photo of a {}."
PHOTO = {**CLIP_LORA, **IMAGENETS_PHOTO}

# BeierZhu/Prompt-align trainers/prograd.py CUSTOM_TEMPLATES: ProGrad's zero-shot classifier and, with
# CTX_INIT, its context words (the template without " {}."); every template ends in " {}."
PROGRAD = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    **IMAGENETS_PHOTO,
}

# htyao89/Textual-based_Class-aware_prompt_tuning trainers/tcp.py CUSTOM_TEMPLATES_ori (Dassl's dataset names as
# vlm_adapt's): the hand-crafted prompt whose zero-shot feature is each class's knowledge, the TKE's input and
# the regulariser's target
TCP = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of a {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    **IMAGENETS_PHOTO,
}

TEMPLATE_SETS: dict[str, dict[str, str]] = {
    "skip_tuning": SKIP_TUNING, "clipfit": CLIPFIT, "clip_lora": CLIP_LORA, "photo": PHOTO, "prograd": PROGRAD,
    "tcp": TCP,
}


def templates_for(dataset_cfg: dict, template_set: str | None) -> tuple[str, ...]:
    """The templates a dataset is prompted with under `template_set` (`dataset`/None: its config's)."""
    own = tuple(dataset_cfg.get("templates") or ["a photo of a {}."])
    if template_set in (None, "dataset"):
        return own
    if template_set not in TEMPLATE_SETS:
        raise ConfigError(
            f"prompt_templates={template_set!r} is not a template set; use 'dataset' (each data config's "
            f"templates) or one of {', '.join(sorted(TEMPLATE_SETS))}."
        )
    table = TEMPLATE_SETS[template_set]
    return (table[dataset_cfg["name"]],) if dataset_cfg.get("name") in table else own
