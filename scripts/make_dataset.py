"""Write the embedded synthetic medical instruction dataset under data/raw/.

    python scripts/make_dataset.py            # writes data/raw/{qa,labs,mcq}.jsonl and
                                              # data/raw/heldout/labs_novel.jsonl
    python scripts/make_dataset.py --out DIR  # somewhere else

Deterministic (one fixed seed, stdlib only): running it twice gives byte-identical files.
Every record is composed from the hand-written, general medical-education facts below
(definitions, first-line treatments, red flags, physiology, drug classes, adult reference
ranges), in French and English. No person, date or identifier appears anywhere.
See data/DATA_CARD.md for the composition and the lab labelling rule.

Files (about 1,000 records in all, well under 1 MB):
  qa.jsonl   ~300  alpaca {"id","instruction","input","output","lang"}
  labs.jsonl  400  alpaca + "label" (closed vocabulary, see FINDINGS)
  mcq.jsonl  ~300  {"id","question","options":{A..D},"answer","explanation","lang"}
  heldout/labs_novel.jsonl  120  lab panels like labs.jsonl's whose decisive value (the
             abnormal analyte's line; all lines of a normal panel) appears in no labs.jsonl
             panel, many outside training's draw range: an evaluation set that recall of the
             training data cannot answer, only the labelling rule (data.heldout_sources; never
             trained on). Answers follow the same template, so their wording overlaps train.
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_LABS = 400
N_LAB_MCQ = 110
N_NOVEL = 120     # 10 per label

# ---------------------------------------------------------------------------
# Conditions: name, category (distractors never come from the same category, so a
# wrong option is never a correct treatment), definition, short first-line option,
# first-line sentence, red flags. Each entry: (en, fr).
# ---------------------------------------------------------------------------
CONDITIONS = [
    dict(
        cat="cardio",
        name=("hypertension", "l'hypertension artérielle"),
        short=("hypertension", "hypertension artérielle"),
        definition=(
            "Hypertension is a persistent elevation of blood pressure, defined in the office as 140/90 mmHg or more on repeated measurements.",
            "L'hypertension artérielle est une élévation persistante de la pression artérielle, définie au cabinet par une valeur d'au moins 140/90 mmHg sur des mesures répétées.",
        ),
        first=(
            "lifestyle measures plus an ACE inhibitor, a calcium channel blocker or a thiazide diuretic",
            "des mesures hygiéno-diététiques associées à un IEC, un inhibiteur calcique ou un diurétique thiazidique",
        ),
        treat=(
            "First-line treatment combines lifestyle measures (less salt, weight loss, physical activity) with an ACE inhibitor or ARB, a calcium channel blocker or a thiazide diuretic.",
            "Le traitement de première intention associe des mesures hygiéno-diététiques (moins de sel, perte de poids, activité physique) à un IEC ou un ARA2, un inhibiteur calcique ou un diurétique thiazidique.",
        ),
        red=(
            "A blood pressure of 180/120 mmHg or more with chest pain, breathlessness, a neurological deficit or visual disturbance suggests a hypertensive emergency requiring urgent care.",
            "Une pression artérielle d'au moins 180/120 mmHg avec douleur thoracique, dyspnée, déficit neurologique ou troubles visuels évoque une urgence hypertensive nécessitant une prise en charge immédiate.",
        ),
    ),
    dict(
        cat="endo",
        name=("type 2 diabetes", "le diabète de type 2"),
        short=("type 2 diabetes", "diabète de type 2"),
        definition=(
            "Type 2 diabetes is chronic hyperglycemia caused by insulin resistance and a relative insulin deficiency; it is diagnosed by a fasting glucose of 7.0 mmol/L or more on two occasions or an HbA1c of 6.5% or more.",
            "Le diabète de type 2 est une hyperglycémie chronique due à une insulinorésistance et à un déficit relatif en insuline ; il est défini par une glycémie à jeun d'au moins 7,0 mmol/L à deux reprises ou une HbA1c d'au moins 6,5 %.",
        ),
        first=("metformin with lifestyle changes", "la metformine associée aux mesures hygiéno-diététiques"),
        treat=(
            "First-line treatment is metformin together with diet, physical activity and weight loss, unless contraindicated.",
            "Le traitement de première intention est la metformine, associée à l'alimentation équilibrée, l'activité physique et la perte de poids, sauf contre-indication.",
        ),
        red=(
            "Intense thirst, polyuria, weight loss, vomiting, drowsiness or deep rapid breathing suggest a hyperosmolar state or ketoacidosis and need urgent assessment.",
            "Une soif intense, une polyurie, un amaigrissement, des vomissements, une somnolence ou une respiration rapide et profonde évoquent un coma hyperosmolaire ou une acidocétose et imposent une évaluation urgente.",
        ),
    ),
    dict(
        cat="infect",
        name=("community-acquired pneumonia", "la pneumonie aiguë communautaire"),
        short=("community-acquired pneumonia", "pneumonie aiguë communautaire"),
        definition=(
            "Community-acquired pneumonia is an acute infection of the lung parenchyma acquired outside hospital, with fever, cough and a new infiltrate on chest imaging.",
            "La pneumonie aiguë communautaire est une infection aiguë du parenchyme pulmonaire acquise hors de l'hôpital, associant fièvre, toux et un infiltrat nouveau à l'imagerie thoracique.",
        ),
        first=("oral amoxicillin", "l'amoxicilline par voie orale"),
        treat=(
            "For a non-severe adult treated at home, first-line treatment is usually oral amoxicillin, with reassessment after 48 to 72 hours.",
            "Chez l'adulte sans signe de gravité traité en ambulatoire, le traitement de première intention est habituellement l'amoxicilline orale, avec réévaluation à 48-72 heures.",
        ),
        red=(
            "Confusion, a respiratory rate of 30 per minute or more, systolic pressure below 90 mmHg or oxygen saturation below 92% are signs of severity requiring hospital care.",
            "Une confusion, une fréquence respiratoire d'au moins 30 par minute, une pression systolique inférieure à 90 mmHg ou une saturation inférieure à 92 % sont des signes de gravité imposant l'hospitalisation.",
        ),
    ),
    dict(
        cat="resp",
        name=("asthma", "l'asthme"),
        short=("asthma", "asthme"),
        definition=(
            "Asthma is a chronic inflammatory disease of the airways with variable and reversible airflow obstruction, causing wheeze, breathlessness, chest tightness and cough.",
            "L'asthme est une maladie inflammatoire chronique des voies aériennes avec une obstruction bronchique variable et réversible, responsable de sifflements, de dyspnée, d'oppression thoracique et de toux.",
        ),
        first=("an inhaled corticosteroid-containing treatment", "un traitement contenant un corticoïde inhalé"),
        treat=(
            "Current guidelines base treatment on an inhaled corticosteroid, for example as-needed inhaled corticosteroid with formoterol, rather than a short-acting bronchodilator alone.",
            "Les recommandations actuelles fondent le traitement sur un corticoïde inhalé, par exemple l'association corticoïde inhalé et formotérol à la demande, plutôt que sur un bronchodilatateur de courte durée seul.",
        ),
        red=(
            "Inability to complete sentences, a silent chest, oxygen saturation below 92%, exhaustion or drowsiness indicate a severe, life-threatening attack.",
            "L'impossibilité de finir ses phrases, un silence auscultatoire, une saturation inférieure à 92 %, l'épuisement ou la somnolence signent une crise grave menaçant le pronostic vital.",
        ),
    ),
    dict(
        cat="resp",
        name=("chronic obstructive pulmonary disease (COPD)", "la bronchopneumopathie chronique obstructive (BPCO)"),
        short=("COPD", "BPCO"),
        definition=(
            "COPD is a chronic, progressive airflow limitation defined by a post-bronchodilator FEV1/FVC ratio below 0.70, mostly caused by tobacco smoking.",
            "La BPCO est une obstruction bronchique chronique et progressive, définie par un rapport VEMS/CVF inférieur à 0,70 après bronchodilatateur, principalement due au tabagisme.",
        ),
        first=("smoking cessation and long-acting bronchodilators", "l'arrêt du tabac et les bronchodilatateurs de longue durée d'action"),
        treat=(
            "The cornerstones are smoking cessation, vaccinations, pulmonary rehabilitation and long-acting inhaled bronchodilators (LAMA and/or LABA).",
            "Les piliers du traitement sont l'arrêt du tabac, les vaccinations, la réhabilitation respiratoire et les bronchodilatateurs inhalés de longue durée d'action (anticholinergique et/ou bêta-2 agoniste).",
        ),
        red=(
            "During an exacerbation, breathlessness at rest, cyanosis, confusion or drowsiness suggest respiratory failure and need emergency care.",
            "Lors d'une exacerbation, une dyspnée de repos, une cyanose, une confusion ou une somnolence font craindre une insuffisance respiratoire aiguë et imposent une prise en charge urgente.",
        ),
    ),
    dict(
        cat="cardio",
        name=("acute myocardial infarction", "l'infarctus du myocarde"),
        short=("acute myocardial infarction", "infarctus du myocarde"),
        definition=(
            "Acute myocardial infarction is necrosis of heart muscle caused by acute ischemia, usually from thrombosis on a ruptured coronary plaque.",
            "L'infarctus du myocarde est une nécrose du muscle cardiaque due à une ischémie aiguë, le plus souvent par thrombose sur une plaque coronaire rompue.",
        ),
        first=("aspirin and urgent coronary reperfusion", "l'aspirine et une reperfusion coronaire en urgence"),
        treat=(
            "In ST-elevation infarction, aspirin is given and the artery is reopened as fast as possible, preferably by primary angioplasty.",
            "En cas d'infarctus avec sus-décalage du segment ST, l'aspirine est administrée et l'artère est reperméabilisée le plus vite possible, de préférence par angioplastie primaire.",
        ),
        red=(
            "Chest pain lasting more than 20 minutes, radiating to the arm or jaw, with sweating, breathlessness or fainting, requires an emergency call.",
            "Une douleur thoracique de plus de 20 minutes, irradiant vers le bras ou la mâchoire, avec sueurs, dyspnée ou malaise, impose d'appeler les secours.",
        ),
    ),
    dict(
        cat="cardio",
        name=("heart failure", "l'insuffisance cardiaque"),
        short=("heart failure", "insuffisance cardiaque"),
        definition=(
            "Heart failure is a syndrome in which the heart cannot pump enough blood to meet the body's needs, or can do so only at raised filling pressures.",
            "L'insuffisance cardiaque est un syndrome dans lequel le cœur ne peut plus assurer un débit adapté aux besoins de l'organisme, ou seulement au prix de pressions de remplissage élevées.",
        ),
        first=("an ACE inhibitor or ARNI, a beta-blocker, an MRA and an SGLT2 inhibitor", "un IEC ou un ARNI, un bêtabloquant, un antagoniste des minéralocorticoïdes et un inhibiteur de SGLT2"),
        treat=(
            "With reduced ejection fraction, four drug classes improve survival: ACE inhibitor or ARNI, beta-blocker, mineralocorticoid receptor antagonist and SGLT2 inhibitor; loop diuretics relieve congestion.",
            "En cas de fraction d'éjection altérée, quatre classes améliorent la survie : IEC ou ARNI, bêtabloquant, antagoniste des minéralocorticoïdes et inhibiteur de SGLT2 ; les diurétiques de l'anse soulagent la congestion.",
        ),
        red=(
            "Breathlessness at rest, inability to lie flat, frothy sputum or low blood pressure suggest acute pulmonary oedema or cardiogenic shock.",
            "Une dyspnée de repos, une orthopnée, des expectorations mousseuses ou une hypotension évoquent un œdème aigu pulmonaire ou un choc cardiogénique.",
        ),
    ),
    dict(
        cat="cardio",
        name=("atrial fibrillation", "la fibrillation atriale"),
        short=("atrial fibrillation", "fibrillation atriale"),
        definition=(
            "Atrial fibrillation is a supraventricular arrhythmia with chaotic atrial activity and an irregularly irregular ventricular rhythm.",
            "La fibrillation atriale est un trouble du rythme supraventriculaire avec une activité atriale désorganisée et un rythme ventriculaire irrégulier.",
        ),
        first=("rate control and anticoagulation according to stroke risk", "le contrôle de la fréquence et l'anticoagulation selon le risque embolique"),
        treat=(
            "Management combines rate control, usually with a beta-blocker, and oral anticoagulation guided by the CHA2DS2-VASc stroke risk score; rhythm control is considered for some patients.",
            "La prise en charge associe le contrôle de la fréquence, habituellement par bêtabloquant, et une anticoagulation orale guidée par le score de risque CHA2DS2-VASc ; le contrôle du rythme est discuté chez certains patients.",
        ),
        red=(
            "Low blood pressure, chest pain, fainting, heart failure or signs of stroke with atrial fibrillation require emergency assessment.",
            "Une hypotension, une douleur thoracique, une syncope, une insuffisance cardiaque ou des signes d'accident vasculaire cérébral associés à une fibrillation atriale imposent une évaluation en urgence.",
        ),
    ),
    dict(
        cat="cardio",
        name=("ischemic stroke", "l'accident vasculaire cérébral ischémique"),
        short=("ischemic stroke", "AVC ischémique"),
        definition=(
            "Ischemic stroke is a sudden focal neurological deficit caused by the occlusion of a cerebral artery.",
            "L'AVC ischémique est un déficit neurologique focal brutal dû à l'occlusion d'une artère cérébrale.",
        ),
        first=("emergency brain imaging then thrombolysis and/or thrombectomy", "une imagerie cérébrale en urgence puis thrombolyse et/ou thrombectomie"),
        treat=(
            "After emergency brain imaging, eligible patients receive intravenous thrombolysis within 4.5 hours of onset and/or mechanical thrombectomy for a large-vessel occlusion.",
            "Après une imagerie cérébrale en urgence, les patients éligibles reçoivent une thrombolyse intraveineuse dans les 4 h 30 suivant le début et/ou une thrombectomie mécanique en cas d'occlusion d'un gros tronc.",
        ),
        red=(
            "A drooping face, weakness of an arm, or speech difficulty of sudden onset means stroke until proven otherwise: call emergency services immediately.",
            "Une déformation de la bouche, une faiblesse d'un bras ou un trouble de la parole d'apparition brutale évoquent un AVC : il faut appeler les secours immédiatement.",
        ),
    ),
    dict(
        cat="heme",
        name=("iron-deficiency anemia", "l'anémie par carence martiale"),
        short=("iron-deficiency anemia", "anémie par carence martiale"),
        definition=(
            "Iron-deficiency anemia is a fall in hemoglobin caused by insufficient iron; it is typically microcytic with a low serum ferritin.",
            "L'anémie par carence martiale est une baisse de l'hémoglobine due à un manque de fer ; elle est typiquement microcytaire avec une ferritine basse.",
        ),
        first=("oral iron and a search for the cause", "le fer par voie orale et la recherche de la cause"),
        treat=(
            "Treatment is oral iron supplementation together with a search for the cause, such as heavy menstrual or digestive blood loss.",
            "Le traitement repose sur une supplémentation en fer par voie orale et la recherche de la cause, comme des pertes sanguines gynécologiques ou digestives.",
        ),
        red=(
            "Breathlessness at rest, chest pain, fainting or black tarry stools with anemia need urgent assessment.",
            "Une dyspnée de repos, une douleur thoracique, un malaise ou un méléna associés à une anémie imposent une évaluation urgente.",
        ),
    ),
    dict(
        cat="infect",
        name=("acute uncomplicated cystitis", "la cystite aiguë simple"),
        short=("acute uncomplicated cystitis", "cystite aiguë simple"),
        definition=(
            "Acute uncomplicated cystitis is a bladder infection in a woman without risk factors, causing burning on urination, frequency and urgency without fever.",
            "La cystite aiguë simple est une infection de la vessie chez une femme sans facteur de risque, responsable de brûlures mictionnelles, de pollakiurie et d'impériosités, sans fièvre.",
        ),
        first=("single-dose fosfomycin or nitrofurantoin", "la fosfomycine en dose unique ou la nitrofurantoïne"),
        treat=(
            "First-line treatment is a single dose of fosfomycin or a short course of nitrofurantoin, depending on local guidelines.",
            "Le traitement de première intention est la fosfomycine en dose unique ou une cure courte de nitrofurantoïne, selon les recommandations locales.",
        ),
        red=(
            "Fever, flank pain, chills or vomiting suggest pyelonephritis and require a different, longer treatment.",
            "Une fièvre, une douleur lombaire, des frissons ou des vomissements évoquent une pyélonéphrite, qui nécessite un traitement différent et plus long.",
        ),
    ),
    dict(
        cat="endo",
        name=("hypothyroidism", "l'hypothyroïdie"),
        short=("hypothyroidism", "hypothyroïdie"),
        definition=(
            "Hypothyroidism is insufficient thyroid hormone production; in the primary form TSH is high and free T4 is low.",
            "L'hypothyroïdie est une production insuffisante d'hormones thyroïdiennes ; dans la forme primaire, la TSH est élevée et la T4 libre basse.",
        ),
        first=("levothyroxine", "la lévothyroxine"),
        treat=(
            "Treatment is levothyroxine, with the dose adjusted on TSH measured six to eight weeks after each change.",
            "Le traitement est la lévothyroxine, dont la dose est adaptée sur la TSH mesurée six à huit semaines après chaque modification.",
        ),
        red=(
            "Hypothermia, confusion, slow heart rate and drowsiness in a hypothyroid patient suggest myxoedema coma, a medical emergency.",
            "Une hypothermie, une confusion, une bradycardie et une somnolence chez un patient hypothyroïdien évoquent un coma myxœdémateux, urgence vitale.",
        ),
    ),
    dict(
        cat="endo",
        name=("hyperthyroidism", "l'hyperthyroïdie"),
        short=("hyperthyroidism", "hyperthyroïdie"),
        definition=(
            "Hyperthyroidism is excessive thyroid hormone production, most often from autoimmune thyroid stimulation; TSH is suppressed.",
            "L'hyperthyroïdie est une production excessive d'hormones thyroïdiennes, le plus souvent d'origine auto-immune ; la TSH est effondrée.",
        ),
        first=("an antithyroid drug plus a beta-blocker for symptoms", "un antithyroïdien de synthèse et un bêtabloquant pour les symptômes"),
        treat=(
            "Initial treatment is usually an antithyroid drug such as carbimazole or methimazole, with a beta-blocker to control palpitations and tremor.",
            "Le traitement initial repose habituellement sur un antithyroïdien de synthèse comme le carbimazole ou le thiamazole, avec un bêtabloquant pour contrôler les palpitations et le tremblement.",
        ),
        red=(
            "High fever, very fast heart rate, agitation, confusion or vomiting suggest thyroid storm, a life-threatening emergency.",
            "Une fièvre élevée, une tachycardie importante, une agitation, une confusion ou des vomissements évoquent une crise aiguë thyréotoxique, urgence vitale.",
        ),
    ),
    dict(
        cat="neuro",
        name=("migraine", "la migraine"),
        short=("migraine", "migraine"),
        definition=(
            "Migraine is a primary headache with recurrent attacks of 4 to 72 hours, often one-sided and pulsating, with nausea and sensitivity to light and noise.",
            "La migraine est une céphalée primaire faite de crises récurrentes de 4 à 72 heures, souvent unilatérales et pulsatiles, avec nausées et gêne à la lumière et au bruit.",
        ),
        first=("an NSAID or paracetamol, then a triptan if insufficient", "un AINS ou le paracétamol, puis un triptan si insuffisant"),
        treat=(
            "Attacks are treated early with an NSAID or paracetamol, and with a triptan if these are insufficient; frequent attacks justify preventive treatment.",
            "Les crises sont traitées tôt par un AINS ou le paracétamol, et par un triptan en cas d'efficacité insuffisante ; des crises fréquentes justifient un traitement de fond.",
        ),
        red=(
            "A sudden thunderclap headache, fever with neck stiffness, a new neurological deficit or a first headache after age 50 must not be attributed to migraine.",
            "Une céphalée brutale en coup de tonnerre, une fièvre avec raideur de nuque, un déficit neurologique nouveau ou une première céphalée après 50 ans ne doivent pas être attribués à une migraine.",
        ),
    ),
    dict(
        cat="gi",
        name=("acute appendicitis", "l'appendicite aiguë"),
        short=("acute appendicitis", "appendicite aiguë"),
        definition=(
            "Acute appendicitis is inflammation of the appendix, typically with pain starting around the navel and moving to the right lower abdomen, fever and vomiting.",
            "L'appendicite aiguë est une inflammation de l'appendice, typiquement avec une douleur péri-ombilicale migrant vers la fosse iliaque droite, de la fièvre et des vomissements.",
        ),
        first=("appendicectomy with antibiotic cover", "l'appendicectomie sous couverture antibiotique"),
        treat=(
            "The standard treatment is surgical removal of the appendix, usually by laparoscopy, with antibiotic cover.",
            "Le traitement de référence est l'ablation chirurgicale de l'appendice, le plus souvent par cœlioscopie, sous couverture antibiotique.",
        ),
        red=(
            "Generalised abdominal guarding, high fever or a rigid abdomen suggest perforation and peritonitis, a surgical emergency.",
            "Une défense abdominale généralisée, une fièvre élevée ou un ventre de bois évoquent une perforation avec péritonite, urgence chirurgicale.",
        ),
    ),
    dict(
        cat="infect",
        name=("sepsis", "le sepsis"),
        short=("sepsis", "sepsis"),
        definition=(
            "Sepsis is life-threatening organ dysfunction caused by a dysregulated host response to infection.",
            "Le sepsis est une dysfonction d'organe menaçant le pronostic vital, causée par une réponse dérégulée de l'hôte à une infection.",
        ),
        first=("blood cultures, broad-spectrum antibiotics within one hour and IV fluids", "des hémocultures, une antibiothérapie large spectre dans l'heure et un remplissage vasculaire"),
        treat=(
            "Blood cultures are drawn, broad-spectrum antibiotics are started within the first hour and intravenous fluids are given for hypotension or high lactate.",
            "On prélève des hémocultures, on débute une antibiothérapie à large spectre dans la première heure et on réalise un remplissage vasculaire en cas d'hypotension ou de lactates élevés.",
        ),
        red=(
            "Confusion, a respiratory rate of 22 per minute or more, systolic pressure of 100 mmHg or less, mottled skin or a lactate above 2 mmol/L signal severity.",
            "Une confusion, une fréquence respiratoire d'au moins 22 par minute, une pression systolique d'au plus 100 mmHg, des marbrures ou des lactates supérieurs à 2 mmol/L signent la gravité.",
        ),
    ),
    dict(
        cat="allergy",
        name=("anaphylaxis", "l'anaphylaxie"),
        short=("anaphylaxis", "anaphylaxie"),
        definition=(
            "Anaphylaxis is a severe, rapidly progressive, life-threatening systemic hypersensitivity reaction.",
            "L'anaphylaxie est une réaction d'hypersensibilité systémique sévère, d'installation rapide, menaçant le pronostic vital.",
        ),
        first=("intramuscular adrenaline", "l'adrénaline intramusculaire"),
        treat=(
            "The first treatment is intramuscular adrenaline (0.5 mg in an adult) into the outer thigh, repeated after 5 minutes if needed.",
            "Le premier traitement est l'adrénaline intramusculaire (0,5 mg chez l'adulte) dans la face externe de la cuisse, à répéter après 5 minutes si besoin.",
        ),
        red=(
            "Stridor, wheeze, swelling of the tongue or throat, hypotension or collapse after exposure to an allergen indicate anaphylaxis.",
            "Un stridor, des sibilants, un gonflement de la langue ou de la gorge, une hypotension ou un malaise après exposition à un allergène évoquent une anaphylaxie.",
        ),
    ),
    dict(
        cat="cardio",
        name=("deep vein thrombosis", "la thrombose veineuse profonde"),
        short=("deep vein thrombosis", "thrombose veineuse profonde"),
        definition=(
            "Deep vein thrombosis is a blood clot in a deep vein, usually of the leg, causing pain and swelling of the calf.",
            "La thrombose veineuse profonde est un caillot dans une veine profonde, le plus souvent du membre inférieur, responsable d'une douleur et d'un gonflement du mollet.",
        ),
        first=("anticoagulation, for example with a direct oral anticoagulant", "une anticoagulation, par exemple par anticoagulant oral direct"),
        treat=(
            "Treatment is anticoagulation, for example with apixaban or rivaroxaban, usually for at least three months.",
            "Le traitement est une anticoagulation, par exemple par apixaban ou rivaroxaban, habituellement pendant au moins trois mois.",
        ),
        red=(
            "Sudden breathlessness, chest pain or coughing blood in a patient with a swollen leg suggest pulmonary embolism.",
            "Une dyspnée brutale, une douleur thoracique ou des crachats sanglants chez un patient à la jambe gonflée évoquent une embolie pulmonaire.",
        ),
    ),
    dict(
        cat="cardio",
        name=("pulmonary embolism", "l'embolie pulmonaire"),
        short=("pulmonary embolism", "embolie pulmonaire"),
        definition=(
            "Pulmonary embolism is the obstruction of pulmonary arteries by a thrombus, usually migrated from the deep veins of the legs.",
            "L'embolie pulmonaire est l'obstruction des artères pulmonaires par un thrombus, le plus souvent migré depuis les veines profondes des membres inférieurs.",
        ),
        first=("anticoagulation, with thrombolysis if there is shock", "une anticoagulation, avec thrombolyse en cas de choc"),
        treat=(
            "Treatment is anticoagulation; systemic thrombolysis is reserved for high-risk embolism with shock or hypotension.",
            "Le traitement est une anticoagulation ; la thrombolyse est réservée à l'embolie à haut risque avec choc ou hypotension.",
        ),
        red=(
            "Fainting, hypotension or signs of shock with pulmonary embolism indicate a high-risk form requiring immediate treatment.",
            "Une syncope, une hypotension ou des signes de choc au cours d'une embolie pulmonaire signent une forme à haut risque nécessitant un traitement immédiat.",
        ),
    ),
    dict(
        cat="gi",
        name=("gastro-oesophageal reflux disease", "le reflux gastro-œsophagien"),
        short=("gastro-oesophageal reflux disease", "reflux gastro-œsophagien"),
        definition=(
            "Gastro-oesophageal reflux disease is the reflux of stomach contents into the oesophagus causing heartburn and regurgitation.",
            "Le reflux gastro-œsophagien pathologique est la remontée du contenu gastrique dans l'œsophage, responsable de pyrosis et de régurgitations.",
        ),
        first=("lifestyle measures and a proton pump inhibitor", "des mesures hygiéno-diététiques et un inhibiteur de la pompe à protons"),
        treat=(
            "Treatment combines lifestyle measures (weight loss, avoiding late meals) with a proton pump inhibitor for typical symptoms.",
            "Le traitement associe des mesures hygiéno-diététiques (perte de poids, éviter les repas tardifs) et un inhibiteur de la pompe à protons en cas de symptômes typiques.",
        ),
        red=(
            "Difficulty swallowing, weight loss, vomiting, digestive bleeding or anemia are alarm signs that call for endoscopy.",
            "Une dysphagie, un amaigrissement, des vomissements, une hémorragie digestive ou une anémie sont des signes d'alarme imposant une endoscopie.",
        ),
    ),
    dict(
        cat="gi",
        name=("peptic ulcer disease", "l'ulcère gastroduodénal"),
        short=("peptic ulcer disease", "ulcère gastroduodénal"),
        definition=(
            "Peptic ulcer disease is a mucosal defect of the stomach or duodenum, mostly caused by Helicobacter pylori infection or anti-inflammatory drugs.",
            "L'ulcère gastroduodénal est une perte de substance de la muqueuse de l'estomac ou du duodénum, principalement due à l'infection à Helicobacter pylori ou aux anti-inflammatoires.",
        ),
        first=("a proton pump inhibitor and Helicobacter pylori eradication", "un inhibiteur de la pompe à protons et l'éradication d'Helicobacter pylori"),
        treat=(
            "Treatment is a proton pump inhibitor, eradication therapy when Helicobacter pylori is present, and stopping anti-inflammatory drugs.",
            "Le traitement associe un inhibiteur de la pompe à protons, l'éradication d'Helicobacter pylori s'il est présent et l'arrêt des anti-inflammatoires.",
        ),
        red=(
            "Vomiting blood, black stools or a sudden, severe abdominal pain suggest bleeding or perforation.",
            "Une hématémèse, un méléna ou une douleur abdominale brutale et intense évoquent une hémorragie ou une perforation.",
        ),
    ),
    dict(
        cat="cardio",
        name=("chronic kidney disease", "la maladie rénale chronique"),
        short=("chronic kidney disease", "maladie rénale chronique"),
        definition=(
            "Chronic kidney disease is an abnormality of kidney structure or function for more than three months, such as an eGFR below 60 mL/min/1.73 m2 or albuminuria.",
            "La maladie rénale chronique est une anomalie de structure ou de fonction rénale de plus de trois mois, comme un DFG estimé inférieur à 60 mL/min/1,73 m2 ou une albuminurie.",
        ),
        first=("blood pressure control with an ACE inhibitor or ARB and avoiding nephrotoxic drugs", "le contrôle tensionnel par IEC ou ARA2 et l'éviction des néphrotoxiques"),
        treat=(
            "Management aims to slow progression: blood pressure control with an ACE inhibitor or ARB, often an SGLT2 inhibitor, and avoiding nephrotoxic drugs.",
            "La prise en charge vise à ralentir la progression : contrôle tensionnel par IEC ou ARA2, souvent un inhibiteur de SGLT2, et éviction des médicaments néphrotoxiques.",
        ),
        red=(
            "Severe hyperkalemia, a sharp fall in urine output, pulmonary oedema or uremic symptoms require urgent nephrology care.",
            "Une hyperkaliémie sévère, une chute de la diurèse, un œdème pulmonaire ou des signes d'urémie imposent une prise en charge néphrologique urgente.",
        ),
    ),
    dict(
        cat="rheum",
        name=("gout", "la goutte"),
        short=("gout", "goutte"),
        definition=(
            "Gout is an inflammatory arthritis caused by monosodium urate crystal deposits, classically affecting the base of the big toe.",
            "La goutte est une arthrite inflammatoire due à des dépôts de cristaux d'urate de sodium, touchant classiquement la base du gros orteil.",
        ),
        first=("colchicine, an NSAID or a corticosteroid for the flare", "la colchicine, un AINS ou un corticoïde pour la crise"),
        treat=(
            "A flare is treated with colchicine, an NSAID or a corticosteroid; long-term urate-lowering therapy with allopurinol prevents recurrences.",
            "La crise est traitée par colchicine, AINS ou corticoïde ; un traitement hypo-uricémiant au long cours par allopurinol prévient les récidives.",
        ),
        red=(
            "A hot, swollen joint with fever must be aspirated to exclude septic arthritis.",
            "Une articulation chaude et gonflée avec fièvre doit être ponctionnée pour éliminer une arthrite septique.",
        ),
    ),
    dict(
        cat="infect",
        name=("bacterial meningitis", "la méningite bactérienne"),
        short=("bacterial meningitis", "méningite bactérienne"),
        definition=(
            "Bacterial meningitis is a bacterial infection of the meninges, presenting with fever, headache, neck stiffness and altered consciousness.",
            "La méningite bactérienne est une infection bactérienne des méninges, associant fièvre, céphalées, raideur de nuque et troubles de la conscience.",
        ),
        first=("immediate intravenous third-generation cephalosporin", "une céphalosporine de troisième génération intraveineuse immédiate"),
        treat=(
            "Treatment is an immediate intravenous third-generation cephalosporin such as ceftriaxone, usually with dexamethasone.",
            "Le traitement est une céphalosporine de troisième génération intraveineuse immédiate comme la ceftriaxone, habituellement associée à la dexaméthasone.",
        ),
        red=(
            "Fever with a purpuric rash that does not fade under pressure suggests meningococcal infection and requires antibiotics without delay.",
            "Une fièvre avec un purpura qui ne s'efface pas à la pression évoque un purpura fulminans et impose une antibiothérapie sans délai.",
        ),
    ),
    dict(
        cat="psych",
        name=("major depressive disorder", "l'épisode dépressif caractérisé"),
        short=("major depressive disorder", "épisode dépressif caractérisé"),
        definition=(
            "Major depressive disorder is a persistent low mood or loss of interest for at least two weeks, with other symptoms such as sleep, appetite and concentration changes.",
            "L'épisode dépressif caractérisé est une humeur triste ou une perte d'intérêt durant au moins deux semaines, associée à d'autres symptômes comme des troubles du sommeil, de l'appétit et de la concentration.",
        ),
        first=("psychotherapy and/or an SSRI antidepressant", "une psychothérapie et/ou un antidépresseur ISRS"),
        treat=(
            "First-line options are psychotherapy and, for moderate to severe episodes, a selective serotonin reuptake inhibitor.",
            "Les options de première intention sont la psychothérapie et, pour les épisodes modérés à sévères, un inhibiteur sélectif de la recapture de la sérotonine.",
        ),
        red=(
            "Suicidal thoughts or plans, psychotic symptoms or refusal to eat and drink require urgent psychiatric assessment.",
            "Des idées ou un projet suicidaires, des symptômes psychotiques ou un refus alimentaire imposent une évaluation psychiatrique urgente.",
        ),
    ),
    dict(
        cat="rheum",
        name=("osteoporosis", "l'ostéoporose"),
        short=("osteoporosis", "ostéoporose"),
        definition=(
            "Osteoporosis is low bone mass with deterioration of bone microarchitecture, defined by a T-score of -2.5 or less, which increases fracture risk.",
            "L'ostéoporose est une diminution de la masse osseuse avec altération de la microarchitecture, définie par un T-score inférieur ou égal à -2,5, qui augmente le risque de fracture.",
        ),
        first=("a bisphosphonate with calcium and vitamin D", "un bisphosphonate avec calcium et vitamine D"),
        treat=(
            "First-line drug treatment is usually an oral bisphosphonate such as alendronate, with adequate calcium and vitamin D and fall prevention.",
            "Le traitement médicamenteux de première intention est habituellement un bisphosphonate oral comme l'alendronate, avec des apports suffisants en calcium et vitamine D et la prévention des chutes.",
        ),
        red=(
            "Sudden back pain after minimal trauma in an older adult suggests a vertebral fracture and needs imaging.",
            "Une douleur dorsale brutale après un traumatisme minime chez une personne âgée évoque une fracture vertébrale et justifie une imagerie.",
        ),
    ),
]

# ---------------------------------------------------------------------------
# Physiology: question, answer sentence, correct short option, three wrong options.
# ---------------------------------------------------------------------------
PHYSIOLOGY = [
    (("Which hormone lowers blood glucose?", "Insulin, secreted by the beta cells of the pancreas, lowers blood glucose by promoting its uptake by muscle, fat and liver.", "insulin", ["glucagon", "cortisol", "adrenaline"]),
     ("Quelle hormone fait baisser la glycémie ?", "L'insuline, sécrétée par les cellules bêta du pancréas, fait baisser la glycémie en favorisant la captation du glucose par le muscle, le tissu adipeux et le foie.", "l'insuline", ["le glucagon", "le cortisol", "l'adrénaline"])),
    (("Which pancreatic hormone raises blood glucose?", "Glucagon, secreted by the alpha cells of the pancreas, raises blood glucose by stimulating glycogen breakdown and gluconeogenesis in the liver.", "glucagon", ["insulin", "calcitonin", "melatonin"]),
     ("Quelle hormone pancréatique augmente la glycémie ?", "Le glucagon, sécrété par les cellules alpha du pancréas, augmente la glycémie en stimulant la glycogénolyse et la néoglucogenèse hépatiques.", "le glucagon", ["l'insuline", "la calcitonine", "la mélatonine"])),
    (("Where is erythropoietin mainly produced in adults?", "In adults, erythropoietin is mainly produced by the kidneys in response to low tissue oxygen, and it stimulates red blood cell production.", "the kidneys", ["the spleen", "the adrenal glands", "the thyroid"]),
     ("Où l'érythropoïétine est-elle principalement produite chez l'adulte ?", "Chez l'adulte, l'érythropoïétine est principalement produite par les reins en réponse à l'hypoxie tissulaire, et elle stimule la production de globules rouges.", "les reins", ["la rate", "les glandes surrénales", "la thyroïde"])),
    (("What is the main function of red blood cells?", "Red blood cells carry oxygen from the lungs to the tissues, bound to hemoglobin.", "oxygen transport", ["blood clotting", "antibody production", "phagocytosis of bacteria"]),
     ("Quelle est la fonction principale des globules rouges ?", "Les globules rouges transportent l'oxygène des poumons vers les tissus, fixé sur l'hémoglobine.", "le transport de l'oxygène", ["la coagulation du sang", "la production d'anticorps", "la phagocytose des bactéries"])),
    (("What is the functional unit of the kidney?", "The nephron is the functional unit of the kidney; each kidney contains about one million nephrons that filter blood and form urine.", "the nephron", ["the alveolus", "the sarcomere", "the acinus"]),
     ("Quelle est l'unité fonctionnelle du rein ?", "Le néphron est l'unité fonctionnelle du rein ; chaque rein en compte environ un million, qui filtrent le sang et forment l'urine.", "le néphron", ["l'alvéole", "le sarcomère", "l'acinus"])),
    (("What is the normal resting heart rate of an adult?", "A normal adult resting heart rate is 60 to 100 beats per minute.", "60 to 100 beats per minute", ["30 to 50 beats per minute", "110 to 150 beats per minute", "150 to 200 beats per minute"]),
     ("Quelle est la fréquence cardiaque normale de repos chez l'adulte ?", "La fréquence cardiaque normale de repos chez l'adulte est de 60 à 100 battements par minute.", "60 à 100 battements par minute", ["30 à 50 battements par minute", "110 à 150 battements par minute", "150 à 200 battements par minute"])),
    (("What is the natural pacemaker of the heart?", "The sinoatrial node, in the right atrium, is the natural pacemaker that initiates each heartbeat.", "the sinoatrial node", ["the atrioventricular node", "the bundle of His", "the Purkinje fibres"]),
     ("Quel est le stimulateur naturel du cœur ?", "Le nœud sinusal, situé dans l'oreillette droite, est le stimulateur naturel qui déclenche chaque battement cardiaque.", "le nœud sinusal", ["le nœud atrioventriculaire", "le faisceau de His", "le réseau de Purkinje"])),
    (("Where does gas exchange take place in the lungs?", "Gas exchange takes place in the alveoli, across a thin membrane in contact with the pulmonary capillaries.", "in the alveoli", ["in the trachea", "in the main bronchi", "in the pleura"]),
     ("Où se font les échanges gazeux dans le poumon ?", "Les échanges gazeux se font dans les alvéoles, à travers une fine membrane au contact des capillaires pulmonaires.", "dans les alvéoles", ["dans la trachée", "dans les bronches souches", "dans la plèvre"])),
    (("Which gland secretes TSH?", "TSH (thyroid-stimulating hormone) is secreted by the anterior pituitary and stimulates the thyroid to produce T4 and T3.", "the anterior pituitary", ["the thyroid", "the hypothalamus", "the adrenal cortex"]),
     ("Quelle glande sécrète la TSH ?", "La TSH (thyréostimuline) est sécrétée par l'antéhypophyse et stimule la thyroïde pour produire la T4 et la T3.", "l'antéhypophyse", ["la thyroïde", "l'hypothalamus", "la corticosurrénale"])),
    (("Which organ produces bile?", "Bile is produced by the liver and stored and concentrated in the gallbladder; it helps digest and absorb fats.", "the liver", ["the gallbladder", "the pancreas", "the spleen"]),
     ("Quel organe produit la bile ?", "La bile est produite par le foie puis stockée et concentrée dans la vésicule biliaire ; elle aide à digérer et absorber les graisses.", "le foie", ["la vésicule biliaire", "le pancréas", "la rate"])),
    (("Where is vitamin B12 absorbed?", "Vitamin B12 is absorbed in the terminal ileum, bound to intrinsic factor secreted by the stomach.", "the terminal ileum", ["the stomach", "the duodenum", "the colon"]),
     ("Où la vitamine B12 est-elle absorbée ?", "La vitamine B12 est absorbée dans l'iléon terminal, liée au facteur intrinsèque sécrété par l'estomac.", "l'iléon terminal", ["l'estomac", "le duodénum", "le côlon"])),
    (("Which electrolyte mainly determines extracellular osmolality?", "Sodium is the main extracellular cation and the main determinant of plasma osmolality.", "sodium", ["potassium", "calcium", "magnesium"]),
     ("Quel électrolyte détermine principalement l'osmolalité extracellulaire ?", "Le sodium est le principal cation extracellulaire et le déterminant majeur de l'osmolalité plasmatique.", "le sodium", ["le potassium", "le calcium", "le magnésium"])),
    (("What is the main intracellular cation?", "Potassium is the main intracellular cation; its gradient across cell membranes sets the resting membrane potential.", "potassium", ["sodium", "chloride", "calcium"]),
     ("Quel est le principal cation intracellulaire ?", "Le potassium est le principal cation intracellulaire ; son gradient de part et d'autre de la membrane fixe le potentiel de repos.", "le potassium", ["le sodium", "le chlorure", "le calcium"])),
    (("Which cells produce antibodies?", "Antibodies are produced by plasma cells, which derive from activated B lymphocytes.", "plasma cells", ["neutrophils", "platelets", "red blood cells"]),
     ("Quelles cellules produisent les anticorps ?", "Les anticorps sont produits par les plasmocytes, issus de la différenciation des lymphocytes B activés.", "les plasmocytes", ["les polynucléaires neutrophiles", "les plaquettes", "les globules rouges"])),
    (("Which hormone controls water reabsorption in the renal collecting duct?", "Antidiuretic hormone (vasopressin), released by the posterior pituitary, increases water reabsorption in the collecting duct.", "antidiuretic hormone (vasopressin)", ["insulin", "calcitonin", "prolactin"]),
     ("Quelle hormone contrôle la réabsorption de l'eau dans le tube collecteur rénal ?", "L'hormone antidiurétique (vasopressine), libérée par la posthypophyse, augmente la réabsorption d'eau dans le tube collecteur.", "l'hormone antidiurétique (vasopressine)", ["l'insuline", "la calcitonine", "la prolactine"])),
    (("Which hormone increases renal sodium reabsorption and potassium excretion?", "Aldosterone, produced by the adrenal cortex, increases sodium reabsorption and potassium excretion in the distal nephron.", "aldosterone", ["calcitonin", "glucagon", "prolactin"]),
     ("Quelle hormone augmente la réabsorption rénale du sodium et l'excrétion du potassium ?", "L'aldostérone, produite par la corticosurrénale, augmente la réabsorption du sodium et l'excrétion du potassium dans le néphron distal.", "l'aldostérone", ["la calcitonine", "le glucagon", "la prolactine"])),
    (("What is the lifespan of a red blood cell?", "A red blood cell circulates for about 120 days before being removed, mainly by the spleen.", "about 120 days", ["about 7 days", "about 30 days", "about one year"]),
     ("Quelle est la durée de vie d'un globule rouge ?", "Un globule rouge circule environ 120 jours avant d'être éliminé, principalement par la rate.", "environ 120 jours", ["environ 7 jours", "environ 30 jours", "environ un an"])),
    (("How is cardiac output calculated?", "Cardiac output equals heart rate multiplied by stroke volume, about 5 litres per minute at rest in an adult.", "heart rate multiplied by stroke volume", ["blood pressure divided by heart rate", "stroke volume divided by heart rate", "heart rate multiplied by blood pressure"]),
     ("Comment calcule-t-on le débit cardiaque ?", "Le débit cardiaque est égal à la fréquence cardiaque multipliée par le volume d'éjection systolique, soit environ 5 litres par minute au repos chez l'adulte.", "la fréquence cardiaque multipliée par le volume d'éjection systolique", ["la pression artérielle divisée par la fréquence cardiaque", "le volume d'éjection divisé par la fréquence cardiaque", "la fréquence cardiaque multipliée par la pression artérielle"])),
    (("Which cells produce pulmonary surfactant?", "Type II pneumocytes produce surfactant, which lowers alveolar surface tension and prevents alveolar collapse.", "type II pneumocytes", ["type I pneumocytes", "alveolar macrophages", "goblet cells"]),
     ("Quelles cellules produisent le surfactant pulmonaire ?", "Les pneumocytes de type II produisent le surfactant, qui diminue la tension superficielle alvéolaire et empêche le collapsus des alvéoles.", "les pneumocytes de type II", ["les pneumocytes de type I", "les macrophages alvéolaires", "les cellules caliciformes"])),
    (("Which vitamin is needed to synthesise clotting factors II, VII, IX and X?", "Vitamin K is required for the synthesis of clotting factors II, VII, IX and X in the liver.", "vitamin K", ["vitamin C", "vitamin D", "vitamin B1"]),
     ("Quelle vitamine est nécessaire à la synthèse des facteurs de coagulation II, VII, IX et X ?", "La vitamine K est nécessaire à la synthèse hépatique des facteurs de coagulation II, VII, IX et X.", "la vitamine K", ["la vitamine C", "la vitamine D", "la vitamine B1"])),
    (("What is the normal respiratory rate of an adult at rest?", "A normal adult respiratory rate at rest is 12 to 20 breaths per minute.", "12 to 20 breaths per minute", ["4 to 8 breaths per minute", "25 to 35 breaths per minute", "40 to 60 breaths per minute"]),
     ("Quelle est la fréquence respiratoire normale de l'adulte au repos ?", "La fréquence respiratoire normale de l'adulte au repos est de 12 à 20 cycles par minute.", "12 à 20 cycles par minute", ["4 à 8 cycles par minute", "25 à 35 cycles par minute", "40 à 60 cycles par minute"])),
    (("Which hormone is secreted by the adrenal medulla?", "The adrenal medulla secretes adrenaline (epinephrine), which prepares the body for stress by raising heart rate and blood glucose.", "adrenaline", ["cortisol", "aldosterone", "TSH"]),
     ("Quelle hormone est sécrétée par la médullosurrénale ?", "La médullosurrénale sécrète l'adrénaline, qui prépare l'organisme au stress en augmentant la fréquence cardiaque et la glycémie.", "l'adrénaline", ["le cortisol", "l'aldostérone", "la TSH"])),
]

# ---------------------------------------------------------------------------
# Drugs: name, class, main use, key adverse effect. Each field (en, fr).
# ---------------------------------------------------------------------------
DRUGS = [
    (("metformin", "la metformine"), ("a biguanide", "un biguanide"), ("type 2 diabetes", "le diabète de type 2"), ("digestive upset and, rarely, lactic acidosis", "des troubles digestifs et, rarement, une acidose lactique")),
    (("amoxicillin", "l'amoxicilline"), ("an aminopenicillin (beta-lactam antibiotic)", "une aminopénicilline (antibiotique bêta-lactamine)"), ("bacterial infections such as pneumonia and otitis", "les infections bactériennes comme la pneumonie et l'otite"), ("allergic rash and diarrhoea", "une éruption allergique et une diarrhée")),
    (("ramipril", "le ramipril"), ("an ACE inhibitor", "un inhibiteur de l'enzyme de conversion (IEC)"), ("hypertension and heart failure", "l'hypertension et l'insuffisance cardiaque"), ("dry cough, hyperkalemia and angioedema", "une toux sèche, une hyperkaliémie et un angio-œdème")),
    (("amlodipine", "l'amlodipine"), ("a dihydropyridine calcium channel blocker", "un inhibiteur calcique dihydropyridinique"), ("hypertension and angina", "l'hypertension et l'angor"), ("ankle oedema and flushing", "des œdèmes des chevilles et des bouffées de chaleur")),
    (("bisoprolol", "le bisoprolol"), ("a cardioselective beta-blocker", "un bêtabloquant cardiosélectif"), ("heart failure, angina and rate control", "l'insuffisance cardiaque, l'angor et le contrôle de la fréquence"), ("bradycardia and fatigue", "une bradycardie et une fatigue")),
    (("furosemide", "le furosémide"), ("a loop diuretic", "un diurétique de l'anse"), ("fluid overload and oedema", "la surcharge hydrosodée et les œdèmes"), ("hypokalemia and dehydration", "une hypokaliémie et une déshydratation")),
    (("atorvastatin", "l'atorvastatine"), ("a statin (HMG-CoA reductase inhibitor)", "une statine (inhibiteur de l'HMG-CoA réductase)"), ("lowering LDL cholesterol and cardiovascular risk", "la baisse du LDL-cholestérol et du risque cardiovasculaire"), ("muscle pain", "des douleurs musculaires")),
    (("omeprazole", "l'oméprazole"), ("a proton pump inhibitor", "un inhibiteur de la pompe à protons"), ("reflux disease and peptic ulcer", "le reflux gastro-œsophagien et l'ulcère"), ("headache and, with long use, low magnesium", "des céphalées et, au long cours, une hypomagnésémie")),
    (("salbutamol", "le salbutamol"), ("a short-acting beta-2 agonist", "un bêta-2 agoniste de courte durée d'action"), ("relief of bronchospasm in asthma and COPD", "le soulagement du bronchospasme dans l'asthme et la BPCO"), ("tremor and palpitations", "des tremblements et des palpitations")),
    (("levothyroxine", "la lévothyroxine"), ("a synthetic thyroid hormone (T4)", "une hormone thyroïdienne de synthèse (T4)"), ("hypothyroidism", "l'hypothyroïdie"), ("palpitations and weight loss when overdosed", "des palpitations et un amaigrissement en cas de surdosage")),
    (("warfarin", "la warfarine"), ("a vitamin K antagonist", "un antivitamine K"), ("prevention and treatment of thrombosis", "la prévention et le traitement des thromboses"), ("bleeding, requiring INR monitoring", "des hémorragies, imposant une surveillance de l'INR")),
    (("apixaban", "l'apixaban"), ("a direct factor Xa inhibitor", "un inhibiteur direct du facteur Xa"), ("atrial fibrillation and venous thrombosis", "la fibrillation atriale et la thrombose veineuse"), ("bleeding", "des hémorragies")),
    (("paracetamol", "le paracétamol"), ("an analgesic and antipyretic", "un antalgique et antipyrétique"), ("pain and fever", "la douleur et la fièvre"), ("liver toxicity in overdose", "une toxicité hépatique en cas de surdosage")),
    (("ibuprofen", "l'ibuprofène"), ("a non-steroidal anti-inflammatory drug (NSAID)", "un anti-inflammatoire non stéroïdien (AINS)"), ("pain, fever and inflammation", "la douleur, la fièvre et l'inflammation"), ("gastric ulcer and kidney injury", "un ulcère gastrique et une atteinte rénale")),
    (("sertraline", "la sertraline"), ("a selective serotonin reuptake inhibitor (SSRI)", "un inhibiteur sélectif de la recapture de la sérotonine (ISRS)"), ("depression and anxiety disorders", "la dépression et les troubles anxieux"), ("nausea and, in older adults, hyponatremia", "des nausées et, chez le sujet âgé, une hyponatrémie")),
    (("spironolactone", "la spironolactone"), ("a mineralocorticoid receptor antagonist", "un antagoniste des récepteurs des minéralocorticoïdes"), ("heart failure and hyperaldosteronism", "l'insuffisance cardiaque et l'hyperaldostéronisme"), ("hyperkalemia and gynecomastia", "une hyperkaliémie et une gynécomastie")),
    (("insulin glargine", "l'insuline glargine"), ("a long-acting insulin analogue", "un analogue lent de l'insuline"), ("basal insulin therapy in diabetes", "l'insulinothérapie basale du diabète"), ("hypoglycemia", "des hypoglycémies")),
    (("prednisolone", "la prednisolone"), ("a glucocorticoid", "un glucocorticoïde"), ("inflammatory and autoimmune diseases", "les maladies inflammatoires et auto-immunes"), ("hyperglycemia and, with long use, osteoporosis", "une hyperglycémie et, au long cours, une ostéoporose")),
    (("allopurinol", "l'allopurinol"), ("a xanthine oxidase inhibitor", "un inhibiteur de la xanthine oxydase"), ("long-term urate lowering in gout", "la baisse de l'uricémie au long cours dans la goutte"), ("skin rash, rarely severe", "une éruption cutanée, rarement grave")),
    (("morphine", "la morphine"), ("an opioid analgesic", "un antalgique opioïde"), ("severe pain", "la douleur intense"), ("respiratory depression and constipation", "une dépression respiratoire et une constipation")),
    (("ceftriaxone", "la ceftriaxone"), ("a third-generation cephalosporin", "une céphalosporine de troisième génération"), ("severe bacterial infections such as meningitis", "les infections bactériennes sévères comme la méningite"), ("allergic reactions and diarrhoea", "des réactions allergiques et une diarrhée")),
]

# ---------------------------------------------------------------------------
# Lab analytes: simplified adult reference ranges (same for every adult, no sex or age
# split: this is teaching data). name (en, fr), unit (en, fr), low, high, decimals.
# ---------------------------------------------------------------------------
ANALYTES = {
    "hb": (("Hemoglobin", "Hémoglobine"), ("g/dL", "g/dL"), 12.0, 16.0, 1),
    "k": (("Potassium (K+)", "Potassium (K+)"), ("mmol/L", "mmol/L"), 3.5, 5.0, 1),
    "na": (("Sodium (Na+)", "Sodium (Na+)"), ("mmol/L", "mmol/L"), 135, 145, 0),
    "glu": (("Fasting glucose", "Glycémie à jeun"), ("mmol/L", "mmol/L"), 3.9, 5.5, 1),
    "crea": (("Creatinine", "Créatinine"), ("µmol/L", "µmol/L"), 60, 110, 0),
    "tsh": (("TSH", "TSH"), ("mIU/L", "mUI/L"), 0.4, 4.0, 2),
    "alt": (("ALT", "ALAT"), ("U/L", "UI/L"), 7, 40, 0),
    "plt": (("Platelets", "Plaquettes"), ("x10^9/L", "G/L"), 150, 400, 0),
    "wbc": (("White blood cell count", "Leucocytes"), ("x10^9/L", "G/L"), 4.0, 10.0, 1),
}

ANALYTE_MEANING = {
    "hb": ("Hemoglobin is the oxygen-carrying protein of red blood cells; a low value defines anemia.",
           "L'hémoglobine est la protéine des globules rouges qui transporte l'oxygène ; une valeur basse définit l'anémie."),
    "k": ("Serum potassium reflects the main intracellular cation; both high and low values can cause dangerous heart rhythm disorders.",
          "La kaliémie reflète le principal cation intracellulaire ; une valeur haute comme basse peut provoquer des troubles du rythme cardiaque graves."),
    "na": ("Serum sodium mainly reflects water balance; a low value (hyponatremia) usually means relative water excess.",
           "La natrémie reflète surtout le bilan de l'eau ; une valeur basse (hyponatrémie) traduit le plus souvent un excès relatif d'eau."),
    "glu": ("Fasting plasma glucose measures blood sugar after at least 8 hours without food; 7.0 mmol/L or more on two occasions indicates diabetes.",
            "La glycémie à jeun mesure le sucre sanguin après au moins 8 heures de jeûne ; une valeur d'au moins 7,0 mmol/L à deux reprises définit le diabète."),
    "crea": ("Serum creatinine is a muscle breakdown product cleared by the kidneys; a raised value suggests reduced kidney function.",
             "La créatinine sérique est un déchet musculaire éliminé par les reins ; une valeur élevée évoque une baisse de la fonction rénale."),
    "tsh": ("TSH is the pituitary hormone that drives the thyroid; it is high in primary hypothyroidism and suppressed in hyperthyroidism.",
            "La TSH est l'hormone hypophysaire qui stimule la thyroïde ; elle est élevée dans l'hypothyroïdie primaire et effondrée dans l'hyperthyroïdie."),
    "alt": ("ALT is a liver enzyme released when liver cells are damaged; a marked rise indicates hepatic cytolysis.",
            "L'ALAT est une enzyme hépatique libérée lors de la souffrance des hépatocytes ; une forte élévation traduit une cytolyse hépatique."),
    "plt": ("Platelets are cell fragments that start clotting; a count below the reference range is called thrombocytopenia.",
            "Les plaquettes sont des fragments cellulaires qui amorcent la coagulation ; un nombre inférieur à la normale s'appelle une thrombopénie."),
    "wbc": ("The white blood cell count measures immune cells in blood; a high count (leukocytosis) is often due to infection or inflammation.",
            "Le nombre de leucocytes mesure les cellules immunitaires du sang ; un nombre élevé (hyperleucocytose) est souvent dû à une infection ou une inflammation."),
}

# Closed label vocabulary. label -> (analyte, direction, abnormal draw range, finding en, finding fr,
# interpretation en, interpretation fr). The abnormal draw range never touches the reference
# range, so the label is unambiguous from the numbers.
FINDINGS = {
    "anemia": ("hb", "low", (6.5, 11.4), "anemia", "anémie",
               "This defines anemia; the MCV and ferritin help find the cause.",
               "Cela définit une anémie ; le VGM et la ferritine orientent vers la cause."),
    "hyperkalemia": ("k", "high", (5.6, 7.2), "hyperkalemia", "hyperkaliémie",
                     "This is hyperkalemia; haemolysis of the sample should be excluded and an ECG obtained.",
                     "Il s'agit d'une hyperkaliémie ; il faut éliminer une hémolyse du prélèvement et réaliser un ECG."),
    "hypokalemia": ("k", "low", (2.3, 3.2), "hypokalemia", "hypokaliémie",
                    "This is hypokalemia, often due to diuretics or digestive losses; an ECG is advised.",
                    "Il s'agit d'une hypokaliémie, souvent liée aux diurétiques ou à des pertes digestives ; un ECG est conseillé."),
    "hyponatremia": ("na", "low", (116, 131), "hyponatremia", "hyponatrémie",
                     "This is hyponatremia; volume status and plasma osmolality guide the cause.",
                     "Il s'agit d'une hyponatrémie ; l'état d'hydratation et l'osmolalité plasmatique orientent vers la cause."),
    "hyperglycemia": ("glu", "high", (7.0, 16.0), "hyperglycemia", "hyperglycémie",
                      "This is fasting hyperglycemia; a value of 7.0 mmol/L or more confirmed on a second sample indicates diabetes.",
                      "Il s'agit d'une hyperglycémie à jeun ; une valeur d'au moins 7,0 mmol/L confirmée sur un second prélèvement définit le diabète."),
    "renal_impairment": ("crea", "high", (140, 480), "renal impairment", "insuffisance rénale",
                         "This suggests renal impairment; the eGFR and previous values distinguish acute from chronic disease.",
                         "Cela évoque une insuffisance rénale ; le DFG estimé et les valeurs antérieures distinguent une atteinte aiguë d'une atteinte chronique."),
    "hypothyroidism": ("tsh", "high", (6.0, 25.0), "hypothyroidism", "hypothyroïdie",
                       "A raised TSH suggests primary hypothyroidism; free T4 confirms it.",
                       "Une TSH élevée évoque une hypothyroïdie primaire ; la T4 libre la confirme."),
    "hyperthyroidism": ("tsh", "low", (0.01, 0.2), "hyperthyroidism", "hyperthyroïdie",
                        "A suppressed TSH suggests hyperthyroidism; free T4 and T3 confirm it.",
                        "Une TSH effondrée évoque une hyperthyroïdie ; la T4 et la T3 libres la confirment."),
    "hepatic_cytolysis": ("alt", "high", (110, 650), "hepatic cytolysis", "cytolyse hépatique",
                          "A marked ALT rise indicates hepatic cytolysis; viral, toxic and drug causes are sought.",
                          "Une forte élévation de l'ALAT traduit une cytolyse hépatique ; on recherche une cause virale, toxique ou médicamenteuse."),
    "thrombocytopenia": ("plt", "low", (25, 125), "thrombocytopenia", "thrombopénie",
                         "This is thrombocytopenia; a blood smear excludes platelet clumping.",
                         "Il s'agit d'une thrombopénie ; un frottis sanguin élimine une agrégation plaquettaire."),
    "leukocytosis": ("wbc", "high", (12.5, 26.0), "leukocytosis", "hyperleucocytose",
                     "This is leukocytosis, most often from infection or inflammation; the differential count helps.",
                     "Il s'agit d'une hyperleucocytose, le plus souvent infectieuse ou inflammatoire ; la formule leucocytaire aide au diagnostic."),
    "normal": (None, None, None, "normal", "bilan normal",
               "No abnormality is found on this panel.",
               "Aucune anomalie n'est retrouvée sur ce bilan."),
}
LAB_INSTRUCTION = ("Analyse the following results:", "Analysez les résultats suivants:")
LAB_CLOSING = ("Finding: {}", "Conclusion : {}")

QA_WRAP = ("Answer the following medical question in one to three sentences.",
           "Répondez à la question médicale suivante en une à trois phrases.")
LANGS = ("en", "fr")


def qa_items():
    """(lang, question, answer) triples from every fact table, in both languages."""
    items = []
    for c in CONDITIONS:
        for li, lang in enumerate(LANGS):
            name = c["name"][li]
            if lang == "en":
                qs = [f"What is {name}?", f"What is the first-line treatment of {name}?",
                      f"What are the red-flag signs in {name}?"]
            else:
                qs = [f"Qu'est-ce que {name} ?", f"Quel est le traitement de première intention de {name} ?",
                      f"Quels sont les signes de gravité de {name} ?"]
            for q, a in zip(qs, (c["definition"][li], c["treat"][li], c["red"][li])):
                items.append((lang, q, a))
    for pair in PHYSIOLOGY:
        for lang, (q, a, _, _) in zip(LANGS, pair):
            items.append((lang, q, a))
    for name, cls, use, adverse in DRUGS:
        en = (f"What is {name[0]} and what is it used for?",
              f"{name[0].capitalize()} is {cls[0]}, used for {use[0]}.")
        fr = (f"Qu'est-ce que {name[1]} et quelle est son indication principale ?",
              f"{_cap(name[1])} est {cls[1]}, {_used_fr(cls[1])} dans {use[1]}.")
        items += [("en", *en), ("fr", *fr)]
        items.append(("en", f"What is a key adverse effect of {name[0]}?",
                      f"A key adverse effect of {name[0]} is {adverse[0]}."))
        items.append(("fr", f"Quel est un effet indésirable important de {name[1]} ?",
                      f"Un effet indésirable important de {name[1]} est {adverse[1]}."))
    for key, (names, units, lo, hi, dec) in ANALYTES.items():
        rng = f"{_fmt(lo, dec)}-{_fmt(hi, dec)}"
        items.append(("en", f"What does the {_lc(names[0])} test measure and what is its adult reference range?",
                      f"{ANALYTE_MEANING[key][0]} A simplified adult reference range is {rng} {units[0]}."))
        items.append(("fr", f"Que mesure le dosage suivant et quelle est sa valeur de référence chez l'adulte : {names[1]} ?",
                      f"{ANALYTE_MEANING[key][1]} Une valeur de référence simplifiée chez l'adulte est {rng} {units[1]}."))
    return items


def _cap(s):
    """Capitalise the first letter only (keeps "l'amoxicilline" -> "L'amoxicilline")."""
    return s[:1].upper() + s[1:]


def _lc(name):
    """Lower-case a test name for use mid-sentence, keeping acronyms ("TSH", "ALT")."""
    return name if name.split()[0].isupper() else name[:1].lower() + name[1:]


def _used_fr(cls_fr):
    """Agree "utilisé" with the class noun: "un biguanide, utilisé" / "une statine, utilisée"."""
    return "utilisée" if cls_fr.startswith("une ") else "utilisé"


def _fmt(x, dec):
    return f"{x:.{dec}f}"


def make_qa(rng):
    """Alpaca Q&A records; one in three puts the question in "input" behind a generic instruction."""
    items = qa_items()
    rng.shuffle(items)
    records = []
    for i, (lang, q, a) in enumerate(items):
        li = LANGS.index(lang)
        instruction, inp = (QA_WRAP[li], q) if i % 3 == 2 else (q, "")
        records.append({"id": f"qa-{i + 1:04d}", "instruction": instruction, "input": inp,
                        "output": a, "lang": lang})
    return records


def draw(rng, key, lo_hi=None):
    """A value for analyte `key`: inside the middle 80% of its reference range, or in lo_hi."""
    _, _, lo, hi, dec = ANALYTES[key]
    if lo_hi is None:
        margin = 0.1 * (hi - lo)  # keeps normal values clearly normal after rounding
        lo_hi = (lo + margin, hi - margin)
    return round(rng.uniform(*lo_hi), dec)


def lab_line(key, value, li):
    names, units, lo, hi, dec = ANALYTES[key]
    ref = "N" if li == 1 else "ref"
    return f"{names[li]}: {_fmt(value, dec)} {units[li]} ({ref}: {_fmt(lo, dec)}-{_fmt(hi, dec)})"


def make_lab(rng, label, li, lo_hi=None):
    """One lab record built around `label`: its analyte abnormal, 1-3 other analytes normal.

    Labelling rule: a panel holds at most one abnormal analyte; the label is the finding for
    that analyte's direction (table FINDINGS), or "normal" when every value is in range.
    """
    target, direction, trained, f_en, f_fr, interp_en, interp_fr = FINDINGS[label]
    lo_hi = lo_hi or trained
    others = [k for k in ANALYTES if k != target]
    n_panel = rng.randint(2, 4)
    keys = rng.sample(others, n_panel - (target is not None))
    values = {k: draw(rng, k) for k in keys}
    if target is not None:
        values[target] = draw(rng, target, lo_hi)
        keys.insert(rng.randrange(len(keys) + 1), target)
    lines = [lab_line(k, values[k], li) for k in keys]
    finding = (f_en, f_fr)[li]
    interp = (interp_en, interp_fr)[li]
    if target is None:
        body = ("All values are within their reference ranges. " if li == 0
                else "Toutes les valeurs sont dans les normes. ") + interp
    else:
        names, units, lo, hi, dec = ANALYTES[target]
        v = _fmt(values[target], dec)
        r = f"{_fmt(lo, dec)}-{_fmt(hi, dec)}"
        if li == 0:
            word = "low" if direction == "low" else "high"
            body = (f"{names[0]} is {word} at {v} {units[0]} (reference {r}). {interp} "
                    "The other values are within their reference ranges.")
        else:
            word = "basse" if direction == "low" else "élevée"
            body = (f"{names[1]} : valeur {word} à {v} {units[1]} (N : {r}). {interp} "
                    "Les autres valeurs sont dans les normes.")
    return {"instruction": LAB_INSTRUCTION[li], "input": "\n".join(lines),
            "output": body + "\n" + LAB_CLOSING[li].format(finding), "lang": LANGS[li],
            "label": label}


def make_labs(rng):
    """N_LABS lab records: labels cycle through FINDINGS (balanced), language alternates per cycle."""
    labels = list(FINDINGS)
    records = []
    for i in range(N_LABS):
        li = (i // len(labels)) % 2  # label cycle i//12 alternates en/fr so every label gets both
        rec = make_lab(rng, labels[i % len(labels)], li)
        records.append({"id": f"labs-{i + 1:04d}", **rec})
    rng.shuffle(records)
    return records


def mcq_items(rng):
    """(lang, question, correct, [3 wrong], explanation) from every fact table."""
    items = []
    for ci, c in enumerate(CONDITIONS):
        other_cat = [o for o in CONDITIONS if o["cat"] != c["cat"]]
        others = [o for o in CONDITIONS if o is not c]
        wrong_t = rng.sample(other_cat, 3)
        wrong_d = rng.sample(others, 3)
        for li, lang in enumerate(LANGS):
            if lang == "en":
                q1 = f"Which is the first-line treatment of {c['name'][0]}?"
                q2 = f"Which condition matches this description: {_lc_def(c['definition'][0], c['short'][0])}"
            else:
                q1 = f"Quel est le traitement de première intention de {c['name'][1]} ?"
                q2 = f"Quelle affection correspond à cette description : {_lc_def(c['definition'][1], c['short'][1])}"
            items.append((lang, q1, c["first"][li], [o["first"][li] for o in wrong_t], c["treat"][li]))
            items.append((lang, q2, c["short"][li], [o["short"][li] for o in wrong_d], c["definition"][li]))
    for pair in PHYSIOLOGY:
        for lang, (q, a, key, wrong) in zip(LANGS, pair):
            items.append((lang, q, key, wrong, a))
    for di, (name, cls, use, _) in enumerate(DRUGS):
        wrong = rng.sample([d for j, d in enumerate(DRUGS) if j != di], 3)
        items.append(("en", f"To which drug class does {name[0]} belong?", cls[0],
                      [w[1][0] for w in wrong], f"{_cap(name[0])} is {cls[0]}, used for {use[0]}."))
        items.append(("fr", f"À quelle classe médicamenteuse appartient {name[1]} ?", cls[1],
                      [w[1][1] for w in wrong], f"{_cap(name[1])} est {cls[1]}, {_used_fr(cls[1])} dans {use[1]}."))
    items += lab_mcq_items(rng)
    return items


def _lc_def(definition, short):
    """Hide the condition's name in its definition: "<Name> is X" -> "X"."""
    for sep in (" is ", " est "):
        head, _, tail = definition.partition(sep)
        if tail and short.lower().split()[0] in head.lower():
            return tail[:1].upper() + tail[1:]
    return definition


def lab_mcq_items(rng):
    """Single-value interpretation questions; the answer follows the labs labelling rule."""
    labels = [k for k in FINDINGS if k != "normal"]
    items, seen = [], set()
    i = 0
    while len(items) < N_LAB_MCQ:
        li = (i // len(labels)) % 2
        label = labels[i % len(labels)]
        i += 1
        target, direction, lo_hi = FINDINGS[label][:3]
        normal = i % 6 == 0  # one in six asks about an in-range value
        value = draw(rng, target, None if normal else lo_hi)
        if (li, target, value) in seen:
            continue
        seen.add((li, target, value))
        names, units, lo, hi, dec = ANALYTES[target]
        correct = "normal" if normal else label
        pool = [k for k in FINDINGS if k != correct]
        wrong = rng.sample(pool, 3)
        fi = 3 if li == 0 else 4
        if li == 0:
            q = (f"An adult has {_lc(names[0])} "
                 f"{_fmt(value, dec)} {units[0]} (reference {_fmt(lo, dec)}-{_fmt(hi, dec)}). "
                 "Which finding does this value show?")
        else:
            q = (f"Chez un adulte, le résultat est le suivant : {names[1]} {_fmt(value, dec)} {units[1]} "
                 f"(N : {_fmt(lo, dec)}-{_fmt(hi, dec)}). Quelle anomalie cette valeur montre-t-elle ?")
        expl = (("The value is within the reference range." if li == 0
                 else "La valeur est dans les normes.") if normal
                else FINDINGS[label][5 + li])
        items.append((LANGS[li], q, FINDINGS[correct][fi], [FINDINGS[w][fi] for w in wrong], expl))
    return items


def make_mcq(rng):
    """MCQ records; the correct letter cycles A-D over the shuffled items, so letters are balanced."""
    items = mcq_items(rng)
    rng.shuffle(items)
    records = []
    for i, (lang, q, correct, wrong, expl) in enumerate(items):
        letter = "ABCD"[i % 4]
        wrong = list(wrong)
        rng.shuffle(wrong)
        wrong.insert("ABCD".index(letter), correct)
        options = {k: _cap(v) for k, v in zip("ABCD", wrong)}
        records.append({"id": f"mcq-{i + 1:04d}", "question": q, "options": options,
                        "answer": letter, "explanation": expl, "lang": lang})
    return records


# Held-out draw ranges of the decisive analyte: each label's training range (FINDINGS) widened
# on its far side, still unambiguous (never touching the reference range).
NOVEL_RANGES = {
    "anemia": (4.5, 11.4), "hyperkalemia": (5.6, 8.2), "hypokalemia": (1.8, 3.2),
    "hyponatremia": (105, 131), "hyperglycemia": (7.0, 28.0), "renal_impairment": (140, 900),
    "hypothyroidism": (6.0, 60.0), "hyperthyroidism": (0.01, 0.2), "hepatic_cytolysis": (110, 1500),
    "thrombocytopenia": (5, 125), "leukocytosis": (12.5, 45.0),
}


def _decisive(record):
    """The lines that decide a panel's label: the abnormal one, or every line of a normal
    panel (its label rests on all of them being in range)."""
    lines = record["input"].split("\n")
    if record["label"] == "normal":
        return {tuple(lines)}
    target = ANALYTES[FINDINGS[record["label"]][0]][0][LANGS.index(record["lang"])]
    return {line for line in lines if line.startswith(target + ":")}


def make_labs_novel(rng, labs):
    """N_NOVEL lab panels (balanced labels, both languages) that recall of `labs` cannot
    answer: the decisive value of each (its abnormal analyte's line; every line of a normal
    panel) appears in no panel of `labs` nor in another novel panel. Abnormal values come
    from NOVEL_RANGES (training's range widened), drawn again while seen."""
    seen = set().union(*(_decisive(r) for r in labs))
    labels = list(FINDINGS)
    records = []
    for i in range(N_NOVEL):
        label, li = labels[i % len(labels)], (i // len(labels)) % 2
        for _ in range(10_000):
            rec = make_lab(rng, label, li, NOVEL_RANGES.get(label))
            if not _decisive(rec) & seen:
                break
        else:
            raise RuntimeError(f"no novel panel for {label} in 10,000 draws")
        seen |= _decisive(rec)
        records.append({"id": f"labs-novel-{i + 1:04d}", **rec})
    rng.shuffle(records)
    return records


def write_jsonl(path, records):
    """One JSON object per line, UTF-8, keys in insertion order, '\\n' line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/raw", help="output directory")
    args = parser.parse_args()
    out = Path(args.out)
    # one generator per file, so adding records to one file never changes the others
    for name, make, seed_offset in (("qa", make_qa, 0), ("labs", make_labs, 1), ("mcq", make_mcq, 2)):
        records = make(random.Random(SEED + seed_offset))
        write_jsonl(out / f"{name}.jsonl", records)
        print(f"{out / name}.jsonl: {len(records)} records")
        if name == "labs":
            novel = make_labs_novel(random.Random(SEED + 3), records)
            write_jsonl(out / "heldout" / "labs_novel.jsonl", novel)
            print(f"{out}/heldout/labs_novel.jsonl: {len(novel)} records")


if __name__ == "__main__":
    main()
