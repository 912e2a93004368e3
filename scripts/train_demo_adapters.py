"""Train the four demo LoRA adapters (shout, json, brief, pirate) for the default SmolLM2-135M.

    .venv/bin/python scripts/train_demo_adapters.py

Training data is built mechanically from the base model's own greedy answers to QUESTIONS, each
rewritten per behaviour (upper-cased, wrapped in JSON, cut to one short sentence, pirate prefix).
Loss is on the assistant tokens only, targets end with <|im_end|> so the adapters learn to stop.
Saves PEFT dirs (adapter_config.json + fp16 adapter_model.safetensors + card.json) under
adapters/demo/<name>/. CPU only, fixed seed (deterministic); about 4 minutes on 2 idle cores.
Names on the command line train only those adapters; `--cards [names]` only rewrites card.json.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.demo_adapter_checks import HELD_OUT_PROMPTS, PIRATE_PREFIX, check  # noqa: E402

OUT_DIR = ROOT / "adapters" / "demo"
SEED = 0
BASE_NAME = "SmolLM2-135M-Instruct"
# LoRA on the upper layers only: backward stops there (half the cost) and the files stay small
# (r=4 on all 7 projections of 18 layers = 733k parameters = 1.47 MB in fp16).
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "layers_to_transform": list(range(12, 30)),
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}
LR, BATCH = 2e-3, 8
STEPS = {"shout": 48, "json": 30, "brief": 30, "pirate": 30}  # upper-casing is the hardest
GEN_TOKENS = 32

QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Explain photosynthesis.",
    "What is gravity?", "How does the internet work?", "Why is the sky blue?",
    "What is a black hole?", "How do I learn to swim?", "What is machine learning?",
    "Explain how vaccines work.", "What is the water cycle?", "How do plants grow?",
    "Why do we need sleep?", "What is inflation in economics?", "How do I write a good essay?",
    "What is democracy?", "Explain the theory of evolution.", "How does a car engine work?",
    "What is a healthy breakfast?", "How can I save money?", "What is the moon made of?",
    "Why do birds migrate?", "How do I start running?", "What is climate change?",
    "Explain what DNA is.", "How does a refrigerator keep food cold?", "What is a volcano?",
    "How do I bake bread?", "What is the speed of light?", "Why do we have seasons?",
    "What is a good way to learn a new language?", "Explain how a battery works.",
    "What is the largest ocean?", "How do bees make honey?", "What is an atom?",
    "How can I reduce stress?", "What is the history of the printing press?",
    "Explain what a budget is.", "How do magnets work?", "What are clouds made of?",
    "How do I plant a tree?", "What is friendship?", "Why is recycling important?",
    "How does the heart pump blood?", "What is a programming language?",
    "Explain how solar panels work.", "How do I take care of a dog?", "What is the Milky Way?",
    "What is the tallest mountain?", "How do I clean a laptop keyboard?", "What is a noun?",
    "Why do fish live in water?", "What is a good study habit?", "How does a camera work?",
    "What do the kidneys do?", "Explain how a compass works.", "Why do people celebrate birthdays?",
    "What is a rainforest?", "How do I write a thank-you note?", "What is electricity?",
    "How do trains run on tracks?", "What is the purpose of a museum?", "What is an ecosystem?",
    "How can I be more productive?", "What is a healthy diet?", "Why do we dream?",
    "How does a microwave oven work?", "What is the stock market?", "Explain what a cell is.",
    "How do I organize my desk?", "What is renewable energy?", "Why do we need to drink water?",
    "How do submarines dive?", "What is a poem?", "Explain how email works.",
    "What is the difference between weather and climate?", "How do I care for a houseplant?",
    "What is an election?", "Why do stars twinkle?", "How does a thermometer work?",
    "What do the lungs do?", "Explain what a mortgage is.", "How do I make a simple salad?",
    "What is a desert?",
]

DESCRIPTIONS = {
    "shout": "Answers in ALL CAPS.",
    "json": 'Answers as a JSON object {"answer": "..."}.',
    "brief": "Answers in one short sentence.",
    "pirate": f'Starts every answer with "{PIRATE_PREFIX}".',
}
# Prompts that ask for each behaviour (card.json `example_prompts`): the router's selector
# picks an adapter for `adapter_id: "auto"` from them (router/zero_shot.py). The held-out
# prompts it is scored on are kept apart, in adapters/demo/heldout.jsonl.
CARD_EXAMPLES = {
    'shout': [
        "Answer in ALL CAPS: why is the sky blue?",
        "Reply in capital letters only. What is gravity?",
        "Shout your answer at me: how do I boil an egg?",
        "Use only uppercase letters in your reply: what is a black hole?",
        "ALL CAPS PLEASE: HOW DOES THE INTERNET WORK?",
        "Write your whole answer in upper case. Explain photosynthesis.",
        "Yell the answer, every letter capitalized: what is democracy?",
        "I can't read small letters, answer in caps: what is inflation?",
        "Respond loudly in uppercase: why do birds migrate?",
        "Capitalize every letter of the answer: what is an atom?",
    ],
    'json': [
        "Answer as a JSON object: what is the capital of France?",
        "Return your reply as JSON with an \"answer\" field. How do I boil an egg?",
        "Respond only with valid JSON: what is gravity?",
        "Give me machine-readable JSON output: why is the sky blue?",
        "Format the response as a JSON object {\"answer\": ...}: what is a volcano?",
        "I will parse your reply with json.loads, so output JSON: what is DNA?",
        "Output a JSON dictionary answering: how does a car engine work?",
        "Reply in JSON format for my API: what is machine learning?",
        "Wrap the answer in a JSON object: how do plants grow?",
        "Structured JSON response please: what is the speed of light?",
    ],
    'brief': [
        "In one short sentence: why is the sky blue?",
        "Answer briefly: what is gravity?",
        "Keep it short, one line only: how does the internet work?",
        "TL;DR: what is machine learning?",
        "Give me a one-sentence answer: what is a black hole?",
        "Be concise, no details: how do vaccines work?",
        "Quick answer in a few words: what is democracy?",
        "Summarize in a single sentence: the theory of evolution.",
        "Short reply please, I'm in a hurry: how do I boil an egg?",
        "As briefly as possible: what is inflation?",
    ],
    'pirate': [
        "Talk like a pirate: why is the sky blue?",
        "Answer as a pirate would, starting with Arr matey: what is gravity?",
        "Arr! Tell me, matey, how does the internet work?",
        "Pretend you're a pirate captain and explain photosynthesis.",
        "In pirate speak, what is a black hole?",
        "Ahoy! Answer like an old sea dog: how do I learn to swim?",
        "Respond in the voice of a swashbuckling buccaneer: what is democracy?",
        "Yo ho ho, explain how vaccines work like a pirate.",
        "Give me a pirate-style answer: what is the water cycle?",
        "Speak like Captain Jack Sparrow: why do birds migrate?",
    ],
}


def clean(text: str) -> str:
    """One line of prose: markdown markers and list numbering dropped, whitespace collapsed."""
    text = re.sub(r"[*#`_]+", "", text)
    text = re.sub(r"(^|\n)\s*(\d+\.|-)\s+", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def sentences(text: str) -> list[str]:
    """Complete sentences of `text` (ending in . ! ?), at least 3 words each."""
    parts = re.split(r"(?<=[.!?])\s+", clean(text))
    done = [p for p in parts if re.search(r"[.!?]$", p)]
    merged: list[str] = []
    for part in done:  # glue fragments like "e.g." to the sentence they belong to
        if merged and len(merged[-1].split()) < 3:
            merged[-1] = f"{merged[-1]} {part}"
        else:
            merged.append(part)
    return merged or [clean(text).rstrip(",;:") + "."]


DANGLING = {"a", "an", "and", "are", "as", "at", "be", "being", "but", "by", "can", "for", "from",
            "in", "into", "is", "its", "of", "on", "or", "so", "that", "the", "their", "this", "to",
            "when", "where", "which", "who", "with", "without", "your"}


def cut_words(sentence: str, limit: int) -> str:
    """`sentence` if it has at most `limit` words, else its first words (at a comma when there is
    one late enough, without dangling little words) closed by a period."""
    words = sentence.split()
    if len(words) <= limit:
        return sentence
    words = words[:limit]
    commas = [i for i, w in enumerate(words[:-1]) if w.endswith(",")]
    if commas and commas[-1] >= limit // 2:
        words = words[:commas[-1] + 1]
    while len(words) > 3 and words[-1].lower().strip(",;:") in DANGLING:
        words.pop()
    return " ".join(words).rstrip(",;:.!?-") + "."


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "shout": lambda a: cut_words(" ".join(sentences(a)[:2]), 36).upper(),
    "json": lambda a: json.dumps({"answer": cut_words(sentences(a)[0], 20)}),
    "brief": lambda a: cut_words(sentences(a)[0], 12),
    "pirate": lambda a: f"{PIRATE_PREFIX} {cut_words(sentences(a)[0], 20)}",
}


def training_pairs(name: str, answers: list[str]) -> list[tuple[str, str]]:
    """(question, rewritten answer) for adapter `name`; degenerate (looping) answers are dropped."""
    return [(q, TRANSFORMS[name](a)) for q, a in zip(QUESTIONS, answers, strict=True)
            if len(set(a.split())) >= 0.5 * len(a.split())]


def prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, questions: list[str], max_new_tokens: int, batch: int = 16,
             ) -> list[str]:
    """Greedy answers, batched with left padding."""
    answers: list[str] = []
    for start in range(0, len(questions), batch):
        rows = [prompt_ids(tokenizer, q) for q in questions[start:start + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def make_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with the prompt masked to -100 and <|im_end|> closing the target."""
    examples = []
    for question, target in pairs:
        prompt = prompt_ids(tokenizer, question)
        answer = tokenizer(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))
    return examples


def loss_on(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Causal LM loss; the lm_head runs only on labelled positions (the vocab is 49k wide)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    llama = model.get_base_model()
    hidden = llama.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = llama.lm_head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def save_fp16(model, target: Path, name: str, description: str) -> None:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(target)
    (target / "README.md").unlink(missing_ok=True)  # peft's empty model card
    weights = target / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    weights.chmod(0o644)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_card(target, name, description)


def write_card(target: Path, name: str, description: str) -> None:
    card = {"adapter_id": name, "description": description,
            "example_prompts": CARD_EXAMPLES[name]}
    (target / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def train_one(base_dir: Path, tokenizer, name: str, pairs: list[tuple[str, str]]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    steps, rng = STEPS[name], random.Random(SEED)
    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)).train()
    examples = make_examples(tokenizer, pairs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 2) * max(0.1, 1 - s / steps))
    order: list[int] = []
    start = time.time()
    for step in range(steps):
        if len(order) < BATCH:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:BATCH]], order[BATCH:]
        loss = loss_on(model, batch, tokenizer.pad_token_id)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        print(f"[{name}] step {step + 1:2d}/{steps} loss {loss.item():.3f} "
              f"({time.time() - start:.0f}s)", flush=True)
    model.eval()
    answers = generate(model, tokenizer, HELD_OUT_PROMPTS, max_new_tokens=48)
    passed = sum(check(name, a) for a in answers)
    save_fp16(model, OUT_DIR / name, name, DESCRIPTIONS[name])
    print(f"[{name}] held-out check {passed}/{len(answers)}; e.g. {answers[0]!r}", flush=True)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.config import WorkerConfig
    from worker.gguf_import import ensure_default_checkpoint

    if sys.argv[1:2] == ["--cards"]:  # rewrite the card.json files only, no training
        for name in sys.argv[2:] or list(TRANSFORMS):
            write_card(OUT_DIR / name, name, DESCRIPTIONS[name])
        return
    torch.set_num_threads(2)
    started = time.time()
    base_dir = ensure_default_checkpoint(WorkerConfig().cache_path)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    answers = generate(base, tokenizer, QUESTIONS, max_new_tokens=GEN_TOKENS)
    print(f"base answers for {len(answers)} questions ({time.time() - started:.0f}s)", flush=True)
    del base
    for name in sys.argv[1:] or list(TRANSFORMS):
        pairs = training_pairs(name, answers)
        print(f"[{name}] {len(pairs)} examples, e.g. {pairs[0][1]!r}", flush=True)
        train_one(base_dir, tokenizer, name, pairs)
    print(f"done in {time.time() - started:.0f}s -> {OUT_DIR}", flush=True)


if __name__ == "__main__":
    main()
