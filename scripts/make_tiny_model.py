"""Build the embedded tiny base model models/tiny-med-llama/ (tokenizer + LlamaForCausalLM).

    HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py          # ~2 min on 2 idle CPU cores
    HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py --steps 50 --out /tmp/tiny   # smoke run

Run scripts/make_dataset.py first: the tokenizer is trained on data/raw/*.jsonl plus the
"textbook" text composed below (kept as it was, so token ids never change); the model is
pretrained on a larger corpus composed at random from the fact tables below (about 550k tokens,
of which 410k are read once: it generalises instead of memorising), so it knows medical French and English and
the lab rules in prose but not the Q&A / lab / MCQ formats, and a LoRA adapter can beat it. Deterministic on CPU (fixed seeds, 2 threads).

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
N_DOCS = 4000  # ~4,300 blocks of 128 tokens (~550k tokens): more than the 200 x 16 = 3,200 blocks pretraining reads
N_HELD_OUT = 64  # blocks kept aside to measure generalisation (64 x 128 = 8,192 tokens)
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


# ---------------------------------------------------------------------------
# Pretraining corpus: many more facts, many sentence templates and paraphrases, numbers drawn
# at random, so the model has to generalise instead of memorising a few hundred sentences.
# Still encyclopaedia / case-report prose: no question-answer, lab-panel ("Name: value unit
# (ref: lo-hi)") or multiple-choice formatting, and no "Finding:" / "Answer:" closing lines,
# so the adapter still has the task formats to learn.
# ---------------------------------------------------------------------------
LABS = [  # (en, fr, unit en, unit fr, low, high, decimals, low finding (en, fr), high finding (en, fr), role en, role fr)
    ("hemoglobin", "l'hémoglobine", "g/dL", "g/dL", 12.0, 16.0, 1, ("anemia", "anémie"), ("polycythemia", "polyglobulie"),
     "the oxygen-carrying protein of red cells", "la protéine des globules rouges qui transporte l'oxygène"),
    ("potassium", "la kaliémie", "mmol/L", "mmol/L", 3.5, 5.0, 1, ("hypokalemia", "hypokaliémie"), ("hyperkalemia", "hyperkaliémie"),
     "the main cation inside cells", "le principal cation intracellulaire"),
    ("sodium", "la natrémie", "mmol/L", "mmol/L", 135, 145, 0, ("hyponatremia", "hyponatrémie"), ("hypernatremia", "hypernatrémie"),
     "a mirror of the water balance", "un reflet du bilan de l'eau"),
    ("fasting glucose", "la glycémie à jeun", "mmol/L", "mmol/L", 3.9, 5.5, 1, ("hypoglycemia", "hypoglycémie"), ("hyperglycemia", "hyperglycémie"),
     "the blood sugar after a night without food", "le sucre du sang après une nuit de jeûne"),
    ("creatinine", "la créatinine", "µmol/L", "µmol/L", 60, 110, 0, None, ("renal impairment", "insuffisance rénale"),
     "a muscle waste product cleared by the kidneys", "un déchet musculaire éliminé par les reins"),
    ("TSH", "la TSH", "mIU/L", "mUI/L", 0.4, 4.0, 2, ("hyperthyroidism", "hyperthyroïdie"), ("hypothyroidism", "hypothyroïdie"),
     "the pituitary hormone that drives the thyroid", "l'hormone hypophysaire qui stimule la thyroïde"),
    ("ALT", "l'ALAT", "U/L", "UI/L", 7, 40, 0, None, ("hepatic cytolysis", "cytolyse hépatique"),
     "an enzyme released by damaged liver cells", "une enzyme libérée par les cellules du foie abîmées"),
    ("platelet count", "les plaquettes", "x10^9/L", "G/L", 150, 400, 0, ("thrombocytopenia", "thrombopénie"), ("thrombocytosis", "thrombocytose"),
     "the cell fragments that start clotting", "les fragments cellulaires qui amorcent la coagulation"),
    ("white cell count", "les leucocytes", "x10^9/L", "G/L", 4.0, 10.0, 1, ("leukopenia", "leucopénie"), ("leukocytosis", "hyperleucocytose"),
     "the immune cells of the blood", "les cellules immunitaires du sang"),
    ("calcium", "la calcémie", "mmol/L", "mmol/L", 2.20, 2.60, 2, ("hypocalcemia", "hypocalcémie"), ("hypercalcemia", "hypercalcémie"),
     "a mineral needed by bones, muscles and nerves", "un minéral nécessaire aux os, aux muscles et aux nerfs"),
    ("CRP", "la CRP", "mg/L", "mg/L", 0, 5, 0, None, ("inflammation", "syndrome inflammatoire"),
     "a protein made by the liver during inflammation", "une protéine fabriquée par le foie lors d'une inflammation"),
    ("ferritin", "la ferritine", "µg/L", "µg/L", 30, 300, 0, ("iron deficiency", "carence en fer"), ("iron overload", "surcharge en fer"),
     "the storage form of iron", "la forme de réserve du fer"),
]

CONDS = [  # (en, fr, organ en, organ fr, sign en, sign fr, treatment en, treatment fr, test en, test fr)
    ("hypertension", "l'hypertension artérielle", "arteries", "les artères", "headache or no symptom at all", "des céphalées ou aucun symptôme",
     "less salt and an ACE inhibitor", "moins de sel et un IEC", "repeated blood pressure readings", "des mesures répétées de la pression artérielle"),
    ("type 2 diabetes", "le diabète de type 2", "pancreas", "le pancréas", "thirst and frequent urination", "une soif et des urines abondantes",
     "metformin and physical activity", "la metformine et l'activité physique", "fasting glucose and HbA1c", "la glycémie à jeun et l'HbA1c"),
    ("asthma", "l'asthme", "bronchi", "les bronches", "wheeze and night cough", "des sifflements et une toux nocturne",
     "an inhaled corticosteroid", "un corticoïde inhalé", "spirometry", "la spirométrie"),
    ("COPD", "la BPCO", "lungs", "les poumons", "chronic cough and breathlessness", "une toux chronique et un essoufflement",
     "stopping smoking and long-acting bronchodilators", "l'arrêt du tabac et des bronchodilatateurs de longue durée", "spirometry", "la spirométrie"),
    ("pneumonia", "la pneumonie", "lungs", "les poumons", "fever, cough and chest pain", "de la fièvre, une toux et une douleur thoracique",
     "amoxicillin", "l'amoxicilline", "a chest X-ray", "une radiographie du thorax"),
    ("heart failure", "l'insuffisance cardiaque", "heart", "le cœur", "breathlessness and swollen ankles", "un essoufflement et des chevilles gonflées",
     "diuretics and an ACE inhibitor", "des diurétiques et un IEC", "echocardiography and BNP", "l'échocardiographie et le BNP"),
    ("atrial fibrillation", "la fibrillation atriale", "heart", "le cœur", "palpitations and an irregular pulse", "des palpitations et un pouls irrégulier",
     "rate control and anticoagulation", "le contrôle de la fréquence et une anticoagulation", "an ECG", "un ECG"),
    ("myocardial infarction", "l'infarctus du myocarde", "heart", "le cœur", "crushing chest pain", "une douleur thoracique constrictive",
     "aspirin and urgent angioplasty", "l'aspirine et une angioplastie en urgence", "an ECG and troponin", "un ECG et la troponine"),
    ("stroke", "l'accident vasculaire cérébral", "brain", "le cerveau", "sudden weakness of one side", "une faiblesse brutale d'un côté",
     "urgent thrombolysis or thrombectomy", "une thrombolyse ou une thrombectomie en urgence", "brain imaging", "l'imagerie cérébrale"),
    ("kidney failure", "l'insuffisance rénale", "kidneys", "les reins", "fatigue and little urine", "une fatigue et peu d'urines",
     "treating the cause and avoiding toxic drugs", "le traitement de la cause et l'arrêt des médicaments toxiques", "creatinine and eGFR", "la créatinine et le DFG"),
    ("urinary tract infection", "l'infection urinaire", "bladder", "la vessie", "burning on urination", "des brûlures en urinant",
     "fosfomycin or nitrofurantoin", "la fosfomycine ou la nitrofurantoïne", "a urine dipstick", "une bandelette urinaire"),
    ("hepatitis", "l'hépatite", "liver", "le foie", "jaundice and fatigue", "un ictère et une fatigue",
     "treating the virus or stopping the toxin", "le traitement du virus ou l'arrêt du toxique", "liver enzymes", "les enzymes hépatiques"),
    ("hypothyroidism", "l'hypothyroïdie", "thyroid", "la thyroïde", "tiredness, weight gain and feeling cold", "une fatigue, une prise de poids et une frilosité",
     "levothyroxine", "la lévothyroxine", "TSH", "la TSH"),
    ("hyperthyroidism", "l'hyperthyroïdie", "thyroid", "la thyroïde", "weight loss, tremor and palpitations", "un amaigrissement, des tremblements et des palpitations",
     "antithyroid drugs", "les antithyroïdiens de synthèse", "TSH and free T4", "la TSH et la T4 libre"),
    ("anemia", "l'anémie", "blood", "le sang", "pallor and tiredness", "une pâleur et une fatigue",
     "treating the cause, for example iron", "le traitement de la cause, par exemple le fer", "a blood count", "une numération formule sanguine"),
    ("gastritis", "la gastrite", "stomach", "l'estomac", "upper abdominal pain", "une douleur du haut de l'abdomen",
     "a proton pump inhibitor", "un inhibiteur de la pompe à protons", "endoscopy", "l'endoscopie"),
    ("appendicitis", "l'appendicite", "appendix", "l'appendice", "pain in the right lower abdomen", "une douleur de la fosse iliaque droite",
     "surgery", "la chirurgie", "an ultrasound or a CT scan", "une échographie ou un scanner"),
    ("sepsis", "le sepsis", "whole body", "l'organisme entier", "fever, confusion and low blood pressure", "de la fièvre, une confusion et une hypotension",
     "antibiotics within one hour and fluids", "des antibiotiques dans l'heure et un remplissage", "blood cultures and lactate", "les hémocultures et les lactates"),
    ("deep vein thrombosis", "la thrombose veineuse profonde", "leg veins", "les veines des jambes", "a painful swollen calf", "un mollet douloureux et gonflé",
     "anticoagulation", "une anticoagulation", "a venous ultrasound", "une échographie veineuse"),
    ("migraine", "la migraine", "brain", "le cerveau", "throbbing headache with nausea", "une céphalée pulsatile avec nausées",
     "rest and a triptan", "le repos et un triptan", "a clinical examination", "l'examen clinique"),
    ("eczema", "l'eczéma", "skin", "la peau", "dry itchy patches", "des plaques sèches qui démangent",
     "emollients and topical steroids", "des émollients et des dermocorticoïdes", "a clinical examination", "l'examen clinique"),
    ("gout", "la goutte", "joints", "les articulations", "a hot swollen big toe", "un gros orteil chaud et gonflé",
     "colchicine and later allopurinol", "la colchicine puis l'allopurinol", "uric acid", "l'uricémie"),
    ("osteoporosis", "l'ostéoporose", "bones", "les os", "fractures after minor falls", "des fractures après des chutes minimes",
     "calcium, vitamin D and a bisphosphonate", "calcium, vitamine D et un bisphosphonate", "bone densitometry", "l'ostéodensitométrie"),
    ("anaphylaxis", "l'anaphylaxie", "whole body", "l'organisme entier", "hives, wheeze and collapse", "une urticaire, des sifflements et un malaise",
     "intramuscular adrenaline", "l'adrénaline intramusculaire", "the history of exposure", "l'histoire de l'exposition"),
]

DRUGS = [  # (name en, name fr, class en, class fr, use en, use fr, adverse effect en, fr)
    ("metformin", "la metformine", "biguanide", "biguanide", "type 2 diabetes", "le diabète de type 2", "digestive upset", "des troubles digestifs"),
    ("amoxicillin", "l'amoxicilline", "penicillin antibiotic", "antibiotique de la famille des pénicillines", "bacterial infections", "les infections bactériennes", "allergic rash", "une éruption allergique"),
    ("ramipril", "le ramipril", "ACE inhibitor", "IEC", "hypertension and heart failure", "l'hypertension et l'insuffisance cardiaque", "dry cough and high potassium", "une toux sèche et une hyperkaliémie"),
    ("amlodipine", "l'amlodipine", "calcium channel blocker", "inhibiteur calcique", "hypertension", "l'hypertension", "ankle swelling", "des œdèmes des chevilles"),
    ("furosemide", "le furosémide", "loop diuretic", "diurétique de l'anse", "fluid overload", "la surcharge hydrique", "low potassium", "une hypokaliémie"),
    ("atorvastatin", "l'atorvastatine", "statin", "statine", "high cholesterol", "l'excès de cholestérol", "muscle pain", "des douleurs musculaires"),
    ("aspirin", "l'aspirine", "antiplatelet drug", "antiagrégant plaquettaire", "preventing heart attacks", "la prévention de l'infarctus", "stomach bleeding", "un saignement digestif"),
    ("apixaban", "l'apixaban", "direct oral anticoagulant", "anticoagulant oral direct", "thrombosis and atrial fibrillation", "la thrombose et la fibrillation atriale", "bleeding", "un saignement"),
    ("levothyroxine", "la lévothyroxine", "thyroid hormone", "hormone thyroïdienne", "hypothyroidism", "l'hypothyroïdie", "palpitations when overdosed", "des palpitations en cas de surdosage"),
    ("omeprazole", "l'oméprazole", "proton pump inhibitor", "inhibiteur de la pompe à protons", "reflux and ulcers", "le reflux et les ulcères", "headache", "des céphalées"),
    ("salbutamol", "le salbutamol", "short-acting bronchodilator", "bronchodilatateur de courte durée", "asthma attacks", "les crises d'asthme", "tremor", "des tremblements"),
    ("insulin", "l'insuline", "hormone", "hormone", "diabetes", "le diabète", "hypoglycemia", "une hypoglycémie"),
    ("paracetamol", "le paracétamol", "analgesic", "antalgique", "pain and fever", "la douleur et la fièvre", "liver damage in overdose", "une atteinte du foie en cas de surdosage"),
    ("ibuprofen", "l'ibuprofène", "anti-inflammatory drug", "anti-inflammatoire", "pain and inflammation", "la douleur et l'inflammation", "kidney and stomach harm", "une atteinte du rein et de l'estomac"),
    ("prednisolone", "la prednisolone", "corticosteroid", "corticoïde", "inflammatory diseases", "les maladies inflammatoires", "high blood sugar", "une hyperglycémie"),
    ("warfarin", "la warfarine", "vitamin K antagonist", "antivitamine K", "thrombosis", "la thrombose", "bleeding", "un saignement"),
    ("spironolactone", "la spironolactone", "potassium-sparing diuretic", "diurétique épargneur de potassium", "heart failure", "l'insuffisance cardiaque", "high potassium", "une hyperkaliémie"),
    ("morphine", "la morphine", "opioid", "opioïde", "severe pain", "la douleur intense", "constipation and drowsiness", "une constipation et une somnolence"),
]

VITALS = [  # (en, fr, unit, low, high, decimals, low word en/fr, high word en/fr)
    ("heart rate", "la fréquence cardiaque", "beats per minute", "battements par minute", 60, 100, 0, ("bradycardia", "bradycardie"), ("tachycardia", "tachycardie")),
    ("temperature", "la température", "°C", "°C", 36.1, 37.8, 1, ("hypothermia", "hypothermie"), ("fever", "fièvre")),
    ("respiratory rate", "la fréquence respiratoire", "breaths per minute", "cycles par minute", 12, 20, 0, ("slow breathing", "bradypnée"), ("tachypnoea", "polypnée")),
    ("oxygen saturation", "la saturation en oxygène", "%", "%", 94, 100, 0, ("hypoxaemia", "hypoxémie"), None),
    ("systolic blood pressure", "la pression artérielle systolique", "mmHg", "mmHg", 90, 140, 0, ("hypotension", "hypotension"), ("high blood pressure", "hypertension")),
]

EN_MEASURE = [
    "{A} was measured at {v} {u}, {rel}.",
    "The laboratory reported {a} at {v} {u}; the usual adult range is {lo} to {hi} {u}, so the value is {lvl}.",
    "With {a} at {v} {u}, the value is {lvl}{why}.",
    "A {a} of {v} {u} is {lvl} compared with the range of {lo} to {hi} {u}{why}.",
    "On the blood test, {a} came back at {v} {u}, which is {lvl}{why}.",
    "{A} of {v} {u} lies {pos} the range of {lo} to {hi} {u}{why}.",
    "In a {age}-year-old {sex}, {a} reached {v} {u}, {rel}.",
    "The doctor noted {a} at {v} {u} and concluded that it was {lvl}{why}.",
]
FR_MEASURE = [
    "On a mesuré {a} à {v} {u}, {rel}.",
    "Le laboratoire rapporte {a} à {v} {u} ; la valeur habituelle chez l'adulte va de {lo} à {hi} {u}, la valeur est donc {lvl}.",
    "Avec {a} à {v} {u}, la valeur est {lvl}{why}.",
    "Une valeur de {v} {u} pour {a} est {lvl} par rapport à l'intervalle de {lo} à {hi} {u}{why}.",
    "Sur la prise de sang, {a} revient à {v} {u}, ce qui est {lvl}{why}.",
    "Chez {sex} de {age} ans, {a} atteint {v} {u}, {rel}.",
    "Le médecin note {a} à {v} {u} et conclut que la valeur est {lvl}{why}.",
]
EN_LABFACT = [
    "{A} is {r}.", "The usual adult range of {a} is {lo} to {hi} {u}.", "{A} is measured in {u}.",
    "Laboratories report {a} in {u}, and most adults lie between {lo} and {hi} {u}.",
    "{A}, {r}, normally stays between {lo} and {hi} {u}.",
]
FR_LABFACT = [
    "{A} est {r}.", "Chez l'adulte, {a} va habituellement de {lo} à {hi} {u}.", "{A} s'exprime en {u}.",
    "Les laboratoires rendent {a} en {u}, et la plupart des adultes se situent entre {lo} et {hi} {u}.",
    "{A}, {r}, reste normalement entre {lo} et {hi} {u}.",
]
EN_LABNAME = ["A {a} below {lo} {u} is called {f}.", "When {a} rises above {hi} {u}, doctors speak of {f}.",
              "{F} means that {a} is {dir} its reference range.", "{F} is recognised by {a} {dir} {lim} {u}."]
FR_LABNAME = ["Une valeur de {a} inférieure à {lo} {u} s'appelle une {f}.", "Quand {a} dépasse {hi} {u}, on parle de {f}.",
              "Le terme {f} signifie que {a} est {dir} de sa valeur normale.", "On reconnaît la {f} à {a} {dir} {lim} {u}."]
EN_COND = [
    "{D} affects the {o}.", "{D} typically causes {s}.", "Patients with {d} often report {s}.",
    "The usual first treatment of {d} is {t}.", "{D} is treated with {t}.", "Doctors confirm {d} with {x}.",
    "When {d} is suspected, {x} helps the diagnosis.", "{D} is a disease of the {o} that causes {s}.",
    "In {d}, the {o} is involved and the patient may have {s}.", "For {d}, guidelines recommend {t} first.",
    "A patient with {s} may have {d}; {x} can confirm it.",
]
FR_COND = [
    "{D} touche {o}.", "{D} provoque souvent {s}.", "Les patients atteints {de_d} décrivent souvent {s}.",
    "Le traitement de première intention {de_d} repose sur {t}.", "{D} se traite par {t}.", "Le diagnostic {de_d} repose sur {x}.",
    "Quand on suspecte {d}, {x} aide au diagnostic.", "{D} est une maladie qui touche {o} et provoque {s}.",
    "Au cours {de_d}, {o} est atteint et le patient peut présenter {s}.",
    "Un patient qui présente {s} peut avoir {d} ; {x} permet de le confirmer.",
]
EN_DRUG = ["{N} is a {c}.", "{N} is used for {use}.", "A common adverse effect of {n} is {ae}.",
           "{N}, a {c}, is prescribed for {use}.", "Patients taking {n} should be watched for {ae}.",
           "As a {c}, {n} treats {use} but may cause {ae}."]
FR_DRUG = ["{N} est un {c}.", "{N} est utilisé dans {use}.", "Un effet indésirable fréquent de {n} est {ae}.",
           "{N}, un {c}, est prescrit dans {use}.", "Sous {n}, il faut surveiller {ae}.",
           "{N} traite {use} mais peut provoquer {ae}."]


def _num(x, dec):
    return f"{x:.{dec}f}"


def lab_sentence(rng, li):
    """A random measured value in prose, with its interpretation (low / normal / high)."""
    a, a_fr, u, u_fr, lo, hi, dec, low, high, r, r_fr = rng.choice(LABS)
    choices = ["normal"] + (["low"] if low else []) + (["high"] if high else [])
    kind = rng.choice(choices)
    span = hi - lo
    if kind == "normal":
        v = rng.uniform(lo + 0.05 * span, hi - 0.05 * span)
    elif kind == "low":
        v = rng.uniform(max(0.0, lo - 0.6 * span), lo - 0.05 * span)
    else:
        v = rng.uniform(hi + 0.05 * span, hi + rng.choice((0.5, 1.5, 4.0)) * span)
    name, unit = (a, u) if li == 0 else (a_fr, u_fr)
    find = {"low": low, "high": high}.get(kind)
    age, sex = rng.randint(18, 90), rng.choice((("man", "woman"), ("un homme", "une femme"))[li])
    fmt = dict(a=name, A=_cap(name), v=_num(v, dec), u=unit, lo=_num(lo, dec), hi=_num(hi, dec), age=age, sex=sex)
    if li == 0:
        fmt.update(lvl={"normal": "normal", "low": "low", "high": "high"}[kind],
                   pos={"normal": "within", "low": "below", "high": "above"}[kind],
                   why="" if kind == "normal" else rng.choice((f", which points to {find[0]}", f" and suggests {find[0]}", f" ({find[0]})")),
                   rel="within the reference range" if kind == "normal" else
                   f"{'below' if kind == 'low' else 'above'} the reference range, a sign of {find[0]}")
        return rng.choice(EN_MEASURE).format(**fmt)
    fmt.update(lvl={"normal": "normale", "low": "basse", "high": "élevée"}[kind],
               why="" if kind == "normal" else rng.choice((f", ce qui évoque une {find[1]}", f" et fait penser à une {find[1]}", f" ({find[1]})")),
               rel="dans les normes" if kind == "normal" else
               f"{'sous' if kind == 'low' else 'au-dessus de'} la valeur de référence, signe d'une {find[1]}")
    return rng.choice(FR_MEASURE).format(**fmt)


def lab_fact(rng, li):
    a, a_fr, u, u_fr, lo, hi, dec, low, high, r, r_fr = rng.choice(LABS)
    if rng.random() < 0.5 and (low or high):
        direction = rng.choice([d for d, f in (("low", low), ("high", high)) if f])
        f = (low if direction == "low" else high)[li]
        lim = _num(lo if direction == "low" else hi, dec)
        if li == 0:
            t = rng.choice([t for t in EN_LABNAME if ("{lo}" not in t or direction == "low") and ("{hi}" not in t or direction == "high")])
            return t.format(a=a, f=f, F=_cap(f), lo=_num(lo, dec), hi=_num(hi, dec), u=u, lim=lim,
                            dir="below" if direction == "low" else "above")
        t = rng.choice([t for t in FR_LABNAME if ("{lo}" not in t or direction == "low") and ("{hi}" not in t or direction == "high")])
        return t.format(a=a_fr, f=f, lo=_num(lo, dec), hi=_num(hi, dec), u=u_fr, lim=lim,
                        dir="en dessous" if direction == "low" else "au-dessus")
    if li == 0:
        return rng.choice(EN_LABFACT).format(a=a, A=_cap(a), r=r, lo=_num(lo, dec), hi=_num(hi, dec), u=u)
    return rng.choice(FR_LABFACT).format(a=a_fr, A=_cap(a_fr), r=r_fr, lo=_num(lo, dec), hi=_num(hi, dec), u=u_fr)


def vital_sentence(rng, li):
    en, fr, u, u_fr, lo, hi, dec, low, high = rng.choice(VITALS)
    kind = rng.choice(["normal"] + (["low"] if low else []) + (["high"] if high else []))
    span = hi - lo
    v = {"normal": lambda: rng.uniform(lo, hi), "low": lambda: rng.uniform(lo - 0.5 * span, lo - 0.05 * span),
         "high": lambda: rng.uniform(hi + 0.05 * span, hi + 0.8 * span)}[kind]()
    f = {"low": low, "high": high}.get(kind)
    if li == 0:
        tail = "which is normal" if kind == "normal" else f"which is {kind}: {f[0]}"
        return f"{_cap(en)} was {_num(v, dec)} {u}, {tail}."
    tail = "ce qui est normal" if kind == "normal" else f"ce qui traduit une {f[1]}"
    return f"{_cap(fr)} était de {_num(v, dec)} {u_fr}, {tail}."


def cond_sentence(rng, li):
    d, d_fr, o, o_fr, s, s_fr, t, t_fr, x, x_fr = rng.choice(CONDS)
    if li == 0:
        return rng.choice(EN_COND).format(d=d, D=_cap(d), o=o, s=s, t=t, x=x)
    de_d = "du " + d_fr[3:] if d_fr.startswith("le ") else "de " + d_fr  # du diabète, de l'asthme
    return rng.choice(FR_COND).format(d=d_fr, D=_cap(d_fr), de_d=de_d, o=o_fr, s=s_fr, t=t_fr, x=x_fr)


def drug_sentence(rng, li):
    n, n_fr, c, c_fr, use, use_fr, ae, ae_fr = rng.choice(DRUGS)
    if li == 0:
        return rng.choice(EN_DRUG).format(n=n, N=_cap(n), c=c, use=use, ae=ae)
    return rng.choice(FR_DRUG).format(n=n_fr, N=_cap(n_fr), c=c_fr, use=use_fr, ae=ae_fr)


def organ_sentence(rng, li):
    o, f, o_fr, f_fr = rng.choice(ORGANS)
    if li == 0:
        return rng.choice(EN_ORGAN).format(o=o, f=f)
    return rng.choice(FR_ORGAN).format(o=o_fr, O=_cap(o_fr), f=f_fr)


SENTENCE_KINDS = [(lab_sentence, 4), (lab_fact, 2), (cond_sentence, 3), (drug_sentence, 2), (vital_sentence, 1), (organ_sentence, 1)]


def corpus(n_docs, rng):
    """Documents of 3-9 random sentences in one language; lab values in prose weigh most."""
    kinds = [k for k, w in SENTENCE_KINDS for _ in range(w)]
    return [" ".join(rng.choice(kinds)(rng, li) for _ in range(rng.randint(3, 9)))
            for li in (i % 2 for i in range(n_docs))]


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
    """AdamW, linear warmup 5% then cosine decay, one pass over the blocks in a fixed shuffled
    order (steps x BATCH <= len(blocks): no block is seen twice, so nothing gets memorised).
    Returns [(step, loss)] every 25 steps."""
    assert steps * BATCH <= len(blocks), f"--steps {steps} x {BATCH} > {len(blocks)} blocks: raise N_DOCS"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(SEED))
    model.train()
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        batch = blocks[order[(step - 1) * BATCH: step * BATCH]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step == 1 or step % 25 == 0:
            curve.append((step, round(loss.item(), 4)))
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:5.1f}s", flush=True)
    model.eval()
    return curve, order[: steps * BATCH]


@torch.no_grad()
def blocks_loss(model, blocks):
    """Mean next-token loss over `blocks` (equal-length, so the mean of block means is exact)."""
    return sum(model(input_ids=b, labels=b).loss.item() for b in blocks.split(BATCH)) / len(blocks.split(BATCH))


@torch.no_grad()
def text_loss(model, tokenizer, text):
    batch = tokenizer(text, return_tensors="pt")
    return model(**batch, labels=batch["input_ids"]).loss.item()


def write_card(out, n_params, curve, steps, n_blocks, eval_loss, losses):
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

A tiny, randomly initialised then pretrained Llama-architecture causal LM that ships
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
plus a short textbook text composed by the script (unchanged since the first release). Special tokens `<unk>`=0, `<s>`=1 (prepended), `</s>`=2,
`<pad>`=3. No chat template, like Mistral-7B-v0.1's base tokenizer: the pipeline applies its
own documented template. Any UTF-8 text round-trips (French accents included).

## How it was made

```
python scripts/make_dataset.py
HF_HUB_OFFLINE=1 python scripts/make_tiny_model.py
```

Seed {SEED}, `torch.set_num_threads(2)`, CPU. Causal-LM pretraining for {steps} steps of
{BATCH} x {SEQ_LEN} tokens (AdamW, lr {LR}, 5% warmup, cosine decay), one pass over
{steps * BATCH:,} of {n_blocks:,} packed blocks (no block seen twice) of a synthetic medical corpus
that the script composes at random from fact tables: {len(LABS)} lab analytes with units and
simplified adult reference ranges, and values drawn at random in prose with their reading (low /
normal / high and the name of the abnormality), {len(CONDS)} conditions (organ, signs, first
treatment, test), {len(DRUGS)} drugs (class, use, adverse effect), vital signs and organ
physiology, each through several English and French sentence templates. It never sees the Q&A,
lab-interpretation or MCQ records nor their formats (no lab panels, no options, no
"Finding:" / "Answer:" lines), so it knows medical language and the lab rules in prose but not
the task formats, which a LoRA adapter has to learn.

Training loss (step: loss): {curve_txt}.
Mean loss after pretraining on {N_HELD_OUT} trained blocks: {losses["train"]:.4f}; on {N_HELD_OUT}
held-out blocks of the same corpus (never trained on): {losses["held_out"]:.4f} (uniform over the
vocabulary would be ln 4096 = 8.32).
Loss on a fixed held-out sentence pair (written by hand, outside the corpus): {eval_loss:.4f}.

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

    # the tokenizer is trained on exactly the text it always was (same rng draws), so token ids
    # and every token count elsewhere stay the same; the pretraining corpus is separate
    paragraphs = textbook(3000, rng)
    tokenizer = train_tokenizer(raw_texts(args.raw) + paragraphs)
    text = "Hémoglobine basse : anémie. Fièvre, œdème, créatinine µmol/L."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    blocks = pack(tokenizer, corpus(N_DOCS, random.Random(SEED + 1)))
    held_out, blocks = blocks[:N_HELD_OUT], blocks[N_HELD_OUT:]  # documents never trained on
    print(f"{n_params:,} parameters, {len(blocks)} + {len(held_out)} held-out blocks of {SEQ_LEN} tokens, vocab {len(tokenizer)}")
    t0 = time.time()
    curve, seen = pretrain(model, blocks, args.steps)
    losses = {"train": blocks_loss(model, blocks[seen[-N_HELD_OUT:]]), "held_out": blocks_loss(model, held_out)}
    print(f"pretraining {time.time() - t0:.0f}s; loss on {N_HELD_OUT} trained blocks {losses['train']:.4f}, "
          f"on {N_HELD_OUT} held-out blocks {losses['held_out']:.4f}")

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
    write_card(out, n_params, curve, args.steps, len(blocks), eval_loss, losses)
    print(f"held-out sentence pair loss {eval_loss:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
