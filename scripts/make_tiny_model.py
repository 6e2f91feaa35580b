"""Build the embedded tiny base model models/tiny-med-llama/ (tokenizer + LlamaForCausalLM).

    HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py          # ~1.5 min on 2 idle CPU cores
    HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py --steps 50 --out /tmp/tiny   # smoke run

Run scripts/make_dataset.py first: the tokenizer is trained on data/raw/*.jsonl plus the
"textbook" text composed below; the model is pretrained on the textbook text only, so it
knows some medical French and English but not the Q&A / lab / MCQ formats, and a LoRA
adapter can measurably beat it. Deterministic on CPU (fixed seeds, 2 threads).

Shape, Mistral-like but tiny (every Linear dimension a multiple of 64, for bnb 4-bit blocks):
  hidden 128, 4 heads x head_dim 32, 2 key/value heads (GQA: k/v out = 2 x 32 = 64),
  MLP 384, 4 layers, vocab 4096, untied embeddings, 1024 positions.
Parameters: embeddings 4096x128 x2 (untied) = 1,048,576; per layer q 16,384 + k 8,192 +
  v 8,192 + o 16,384 + MLP 3x128x384 = 147,456 + 2 norms 256 = 196,864; x4 = 787,456;
  final norm 128 -> 1,836,160 parameters, 7.3 MB in float32.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

SEED = 1234
VOCAB_SIZE = 4096
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
SEQ_LEN = 128
BATCH = 16  # 16 x 128 = 2,048 tokens per step
LR = 3e-3
HELD_OUT = "Le potassium est un électrolyte essentiel. The kidney filters blood and makes urine."

# ---------------------------------------------------------------------------
# Textbook corpus: encyclopaedia-style sentences, composed from these small tables.
# It deliberately contains no question/answer, lab-panel or multiple-choice formatting.
# ---------------------------------------------------------------------------
ORGANS = [  # (en, en function, fr with article, fr function)
    ("heart", "pumps blood through the body", "le cœur", "pompe le sang dans tout l'organisme"),
    ("lungs", "bring oxygen into the blood and remove carbon dioxide", "les poumons", "apportent l'oxygène au sang et éliminent le gaz carbonique"),
    ("kidneys", "filter the blood and produce urine", "les reins", "filtrent le sang et produisent l'urine"),
    ("liver", "stores glycogen, makes bile and clears many drugs", "le foie", "stocke le glycogène, fabrique la bile et élimine de nombreux médicaments"),
    ("pancreas", "secretes digestive enzymes, insulin and glucagon", "le pancréas", "sécrète des enzymes digestives, l'insuline et le glucagon"),
    ("thyroid", "produces the hormones T4 and T3 that set the metabolic rate", "la thyroïde", "produit les hormones T4 et T3 qui règlent le métabolisme"),
    ("stomach", "stores food and starts protein digestion with acid and pepsin", "l'estomac", "stocke les aliments et commence la digestion des protéines grâce à l'acide et à la pepsine"),
    ("bone marrow", "produces red cells, white cells and platelets", "la moelle osseuse", "produit les globules rouges, les globules blancs et les plaquettes"),
    ("brain", "controls movement, sensation, thought and memory", "le cerveau", "contrôle le mouvement, la sensibilité, la pensée et la mémoire"),
    ("spleen", "removes old red cells and takes part in immunity", "la rate", "élimine les vieux globules rouges et participe à l'immunité"),
    ("adrenal glands", "produce cortisol, aldosterone and adrenaline", "les glandes surrénales", "produisent le cortisol, l'aldostérone et l'adrénaline"),
    ("small intestine", "absorbs most nutrients from food", "l'intestin grêle", "absorbe la plupart des nutriments des aliments"),
    ("skin", "protects the body and helps regulate temperature", "la peau", "protège l'organisme et participe à la régulation de la température"),
    ("pituitary gland", "controls several other endocrine glands", "l'hypophyse", "contrôle plusieurs autres glandes endocrines"),
]

DISEASES = [  # (en, en organ, en feature, fr with article, fr organ with article, fr feature)
    ("anemia", "blood", "a low hemoglobin level", "l'anémie", "le sang", "un taux d'hémoglobine bas"),
    ("hypertension", "arteries", "a blood pressure that stays high", "l'hypertension", "les artères", "une pression artérielle durablement élevée"),
    ("diabetes", "pancreas", "a high blood glucose", "le diabète", "le pancréas", "une glycémie élevée"),
    ("asthma", "bronchi", "a variable narrowing of the airways", "l'asthme", "les bronches", "un rétrécissement variable des voies aériennes"),
    ("pneumonia", "lungs", "an infection of the lung tissue", "la pneumonie", "les poumons", "une infection du tissu pulmonaire"),
    ("heart failure", "heart", "a weak pumping of the heart", "l'insuffisance cardiaque", "le cœur", "une pompe cardiaque défaillante"),
    ("kidney failure", "kidneys", "a fall in the filtration of the blood", "l'insuffisance rénale", "les reins", "une baisse de la filtration du sang"),
    ("hepatitis", "liver", "an inflammation of the liver", "l'hépatite", "le foie", "une inflammation du foie"),
    ("hypothyroidism", "thyroid", "too little thyroid hormone", "l'hypothyroïdie", "la thyroïde", "un manque d'hormones thyroïdiennes"),
    ("hyperthyroidism", "thyroid", "too much thyroid hormone", "l'hyperthyroïdie", "la thyroïde", "un excès d'hormones thyroïdiennes"),
    ("gastritis", "stomach", "an inflammation of the stomach lining", "la gastrite", "l'estomac", "une inflammation de la muqueuse de l'estomac"),
    ("stroke", "brain", "a sudden loss of blood supply to part of the brain", "l'accident vasculaire cérébral", "le cerveau", "une interruption brutale de la circulation dans une partie du cerveau"),
    ("leukemia", "bone marrow", "an uncontrolled growth of white cells", "la leucémie", "la moelle osseuse", "une prolifération incontrôlée des globules blancs"),
    ("thrombocytopenia", "blood", "a low platelet count", "la thrombopénie", "le sang", "un nombre bas de plaquettes"),
    ("dehydration", "body", "a lack of body water", "la déshydratation", "l'organisme", "un manque d'eau dans l'organisme"),
    ("eczema", "skin", "a dry and itchy inflammation of the skin", "l'eczéma", "la peau", "une inflammation sèche et prurigineuse de la peau"),
]

ANALYTES = [  # (en, fr with article, unit en, unit fr, low, high, en role, fr role)
    ("hemoglobin", "l'hémoglobine", "g/dL", "g/dL", "12.0", "16.0", "carries oxygen in red cells", "transporte l'oxygène dans les globules rouges"),
    ("potassium", "le potassium", "mmol/L", "mmol/L", "3.5", "5.0", "controls the electrical activity of the heart", "contrôle l'activité électrique du cœur"),
    ("sodium", "le sodium", "mmol/L", "mmol/L", "135", "145", "reflects the water balance", "reflète le bilan de l'eau"),
    ("fasting glucose", "la glycémie à jeun", "mmol/L", "mmol/L", "3.9", "5.5", "measures blood sugar after a night without food", "mesure le sucre du sang après une nuit de jeûne"),
    ("creatinine", "la créatinine", "µmol/L", "µmol/L", "60", "110", "reflects kidney function", "reflète la fonction rénale"),
    ("TSH", "la TSH", "mIU/L", "mUI/L", "0.4", "4.0", "drives the thyroid gland", "stimule la glande thyroïde"),
    ("ALT", "l'ALAT", "U/L", "UI/L", "7", "40", "rises when liver cells are damaged", "augmente lorsque les cellules du foie souffrent"),
    ("platelet count", "la numération plaquettaire", "x10^9/L", "G/L", "150", "400", "reflects the cells that start clotting", "reflète les cellules qui amorcent la coagulation"),
    ("white cell count", "la numération leucocytaire", "x10^9/L", "G/L", "4.0", "10.0", "reflects the cells of immunity", "reflète les cellules de l'immunité"),
    ("calcium", "le calcium", "mmol/L", "mmol/L", "2.20", "2.60", "is needed for bones, muscles and nerves", "est nécessaire aux os, aux muscles et aux nerfs"),
]

EN_ORGAN = ["The {o} {f}.", "In the human body, the {o} {f}.", "Physiology teaches that the {o} {f}.",
            "Every day, the {o} {f}."]
FR_ORGAN = ["{O} {f}.", "Dans le corps humain, {o} {f}.", "En physiologie, on apprend que {o} {f}."]
EN_DISEASE = ["{D} is a condition of the {o} marked by {f}.", "In {d}, doctors find {f}.",
              "{D} affects the {o} and is defined by {f}."]
FR_DISEASE = ["{D} est une maladie qui touche {o}, avec {f}.", "Dans {d}, le médecin constate {f}.",
              "{D} se définit par {f}."]
EN_LAB = ["The {a} {r}.", "In adults, the usual range of {a} is {lo} to {hi} {u}.",
          "A value of {a} below {lo} {u} is low, and above {hi} {u} it is high."]
FR_LAB = ["{A} {r}.", "Chez l'adulte, la valeur habituelle de {a} va de {lo} à {hi} {u}.",
          "Une valeur de {a} inférieure à {lo} {u} est basse, et supérieure à {hi} {u} elle est élevée."]


def _cap(s):
    return s[:1].upper() + s[1:]


def textbook_sentences():
    """Every sentence of the textbook corpus, as (english, french) lists in a fixed order."""
    en, fr = [], []
    for o, f, o_fr, f_fr in ORGANS:
        en += [t.format(o=o, f=f) for t in EN_ORGAN]
        fr += [t.format(o=o_fr, O=_cap(o_fr), f=f_fr) for t in FR_ORGAN]
    for d, o, f, d_fr, o_fr, f_fr in DISEASES:
        en += [t.format(d=d, D=_cap(d), o=o, f=f) for t in EN_DISEASE]
        fr += [t.format(d=d_fr, D=_cap(d_fr), o=o_fr, f=f_fr) for t in FR_DISEASE]
    for a, a_fr, u, u_fr, lo, hi, r, r_fr in ANALYTES:
        en += [t.format(a=a, u=u, lo=lo, hi=hi, r=r) for t in EN_LAB]
        fr += [t.format(a=a_fr.split(" ", 1)[-1] if a_fr.startswith(("le ", "la ")) else a_fr[2:],
                        A=_cap(a_fr), u=u_fr, lo=lo, hi=hi, r=r_fr) for t in FR_LAB]
    return en, fr


def textbook(n_paragraphs, rng):
    """Paragraphs of 4-8 distinct random sentences, each in one language (half EN, half FR)."""
    en, fr = textbook_sentences()
    return [" ".join(rng.sample((en, fr)[i % 2], rng.randint(4, 8))) for i in range(n_paragraphs)]


def raw_texts(raw_dir):
    """All string values of data/raw/*.jsonl, MCQ options included (tokenizer training only)."""
    texts = []
    for path in sorted(Path(raw_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for v in json.loads(line).values():
                texts += list(v.values()) if isinstance(v, dict) else [v]
    return texts


def train_tokenizer(texts):
    """Byte-level BPE (like GPT-2/Llama-3): every byte is in the alphabet, so no <unk> on any text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # prepend <s> like Mistral/Llama base tokenizers; no </s> (the pipeline adds it to targets)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=1024)
    return fast  # no chat_template on purpose: a base model, like Mistral-7B-v0.1


def build_model(tokenizer):
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def pack(tokenizer, paragraphs):
    """Concatenate "<s> paragraph </s>" streams and cut SEQ_LEN-token blocks (no padding)."""
    ids = []
    for p in paragraphs:
        ids += tokenizer(p)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)


def pretrain(model, blocks, steps):
    """AdamW, linear warmup 5% then cosine decay; returns [(step, loss)] every 25 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step == 1 or step % 25 == 0:
            curve.append((step, round(loss.item(), 4)))
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:5.1f}s", flush=True)
    model.eval()
    return curve


@torch.no_grad()
def text_loss(model, tokenizer, text):
    batch = tokenizer(text, return_tensors="pt")
    return model(**batch, labels=batch["input_ids"]).loss.item()


def write_card(out, n_params, curve, steps, n_blocks, eval_loss):
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    shown = curve[:: max(1, len(curve) // 8)]
    shown += [curve[-1]] if shown[-1] != curve[-1] else []
    curve_txt = ", ".join(f"{s}: {l}" for s, l in shown)
    (out / "README.md").write_text(f"""---
license: apache-2.0
language: [en, fr]
library_name: transformers
pipeline_tag: text-generation
---
# tiny-med-llama

A tiny, randomly initialised then briefly pretrained Llama-architecture causal LM that ships
inside the medqlora repository as its offline default base model. **Not for any real use**:
it exists so the pipeline (4-bit load, LoRA training, evaluation, merge, packaging) runs on a
CPU in minutes without touching a model hub. Its outputs are not medical advice, nor sensible.

## Architecture (`LlamaForCausalLM`, Mistral-like grouped-query attention)

| field | value |
|---|---|
| hidden_size | 128 |
| intermediate_size | 384 |
| num_hidden_layers | 4 |
| num_attention_heads / head_dim | 4 / 32 |
| num_key_value_heads | 2 (GQA) |
| max_position_embeddings | 1024 |
| vocab_size | {len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])} |
| tie_word_embeddings | false |
| parameters | {n_params:,} |
| weights | float32, `model.safetensors` |

Every Linear layer's dimensions are multiples of 64, so bitsandbytes 4-bit (nf4) blocks fit.

## Tokenizer

Byte-level BPE trained with `tokenizers` (vocab 4096, min frequency 2) on `data/raw/*.jsonl`
plus the textbook text below. Special tokens `<unk>`=0, `<s>`=1 (prepended), `</s>`=2,
`<pad>`=3. No chat template, like Mistral-7B-v0.1's base tokenizer: the pipeline applies its
own documented template. Any UTF-8 text round-trips (French accents included).

## How it was made

```
python scripts/make_dataset.py
HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py
```

Seed {SEED}, `torch.set_num_threads(2)`, CPU. Causal-LM pretraining for {steps} steps of
{BATCH} x {SEQ_LEN} tokens (AdamW, lr {LR}, 5% warmup, cosine decay) on {n_blocks} packed
blocks of a synthetic "textbook" corpus that the script composes: short encyclopaedia-style
sentences in English and French about organs, conditions and lab analytes with simplified adult
reference ranges. It never sees the Q&A, lab-interpretation or MCQ records, so it knows some
medical language but not the task formats.

Training loss (step: loss): {curve_txt}.
Loss on a held-out sentence pair: {eval_loss:.4f}.

Folder size: {size_mb:.1f} MB. License: Apache-2.0 (same as the project).
""", encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", default="data/raw", help="dataset made by scripts/make_dataset.py")
    parser.add_argument("--out", default="models/tiny-med-llama")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps (200 ~ 1.5 min on 2 idle cores)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    out = Path(args.out)

    paragraphs = textbook(3000, rng)
    tokenizer = train_tokenizer(raw_texts(args.raw) + paragraphs)
    text = "Hémoglobine basse : anémie. Fièvre, œdème, créatinine µmol/L."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    blocks = pack(tokenizer, paragraphs)
    print(f"{n_params:,} parameters, {len(blocks)} blocks of {SEQ_LEN} tokens, vocab {len(tokenizer)}")
    curve = pretrain(model, blocks, args.steps)

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # reload exactly as the pipeline will, and check the round trip
    tok2 = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    eval_loss = text_loss(reloaded, tok2, HELD_OUT)
    assert abs(eval_loss - text_loss(model, tokenizer, HELD_OUT)) < 1e-5
    write_card(out, n_params, curve, args.steps, len(blocks), eval_loss)
    print(f"held-out loss {eval_loss:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
