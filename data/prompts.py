"""R1-AQA's prompt templates (arXiv:2503.11197; docs/FACTS.md), the chat message, and SFT targets.

The choices are rendered with Python's str(list) -- "['a', 'b']" -- exactly as R1-AQA's
f-string does, quotes and all; the model was trained and evaluated on that rendering.
"""

_BASE = "{question} Please choose the answer from the following options: {choices}."
_SUFFIX = {
    1: "",
    2: " Output the final answer in <answer> </answer>.",
    3: " Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
}

# what the audio part of the user message carries; the chat template only checks the type
AUDIO_PLACEHOLDER = "<audio>"


TEMPLATES = (1, 2, 3)  # R1-AQA's prompts <1>, <2>, <3>


def template_id(template):
    """1/2/3 or "1"/"2"/"3" -> int; anything else is a ValueError."""
    if isinstance(template, bool) or str(template) not in [str(t) for t in TEMPLATES]:
        raise ValueError(f"prompt template must be 1, 2 or 3, got {template!r}")
    return int(template)


def format_prompt(question, choices, template):
    t = template_id(template)
    return _BASE.format(question=question, choices=str(list(choices))) + _SUFFIX[t]


def build_messages(text, audio_url=AUDIO_PLACEHOLDER, *, system=None):
    """One user turn: the audio, then the text; after a system turn of `system` when given.

    The Qwen2-Audio chat template renders the audio part as
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n" and adds its default system line when there
    is no system turn; Qwen2.5-Omni's renders "<|audio_bos|><|AUDIO|><|audio_eos|>" and is
    given the system prompt that model expects (the processor carries it: data.collate)."""
    user = {"role": "user", "content": [
        {"type": "audio", "audio_url": audio_url},
        {"type": "text", "text": text},
    ]}
    return [user] if system is None else [{"role": "system", "content": system}, user]


def answer_target(answer, template):
    """SFT target for a prompt template: <1> the bare answer (R1-AQA's SFT baselines),
    <2> "<answer>a</answer>" (R1-AQA's `solution` field), <3> an empty think block then the
    answer, so the target also earns the <3> format reward."""
    t = template_id(template)
    if t == 1:
        return answer
    if t == 2:
        return f"<answer>{answer}</answer>"
    return f"<think></think><answer>{answer}</answer>"


def prompt_corpus(choices: dict, questions: dict) -> list[str]:
    """Every string a prompt or answer of these tasks can contain, for training a tiny tokenizer:
    each task's choice words, each question alone and under each template (with the full choice
    list, in both orders), and each answer target. ``choices``/``questions``: task -> its words /
    its question wordings."""
    texts = ["You are a helpful assistant."]
    for task, options in choices.items():
        words = list(options)
        texts += words
        for q in questions[task]:
            texts.append(q)
            for template in TEMPLATES:
                texts.append(format_prompt(q, words, template))
                texts.append(format_prompt(q, words[::-1], template))
        texts += [answer_target(w, t) for w in words for t in TEMPLATES]
    return texts
