"""The 605-condition catalogue: what each condition id means, and how it behaves.

Seed 000 maps ICD codes into ~600 consolidated conditions. Here each condition is one ICD-10-CM
three-character category, named ``"<organ system>: <category title>"``. ICD-10-CM chapter and
category titles are a US-government work (NCHS/CMS) in the public domain; the titles below were
typed in (some shortened), not downloaded. Condition ids are the row order of the catalogue and
are part of schema version 1: never reorder, only append in a new schema version.

Besides its name, each condition carries the qualitative facts the simulator needs (numbers
such as prevalence are drawn from the seed, see ``mirror.data.simulator``):

* ``chronic``: once present it recurs at follow-up visits for the rest of the enrollment;
* ``common``: one of the high-prevalence conditions (hypertension, back pain, colds...), which
  get the top of the long-tailed prevalence ranking;
* ``sex``: ``"female"`` or ``"male"`` when the condition is anatomically sex-specific
  (hazard exactly zero in the other sex), else ``None``; ``sex_bias`` is +1 for
  female-predominant, -1 for male-predominant, 0 otherwise;
* ``profile``: shape of the incidence over age (see ``AGE_PROFILES``).

Catalogue line format: ``CODE|flags|title``; chapter lines ``## System|default-profile``.
Flags: c chronic, k common, f/m female/male only, F/M female/male predominant, and at most one
age-profile letter (overrides the chapter default).
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.data.vocab import N_CONDITIONS

# Age profiles: how a condition's incidence varies over life (shapes in simulator.py).
AGE_PROFILES = {
    "a": "adult: rises steadily with age",
    "p": "paediatric: highest in the first years, fading by adolescence",
    "n": "neonatal: first five-year age group only",
    "y": "young adult: peaks around 20-35",
    "o": "reproductive age: 15-49 only",
    "d": "midlife: peaks around 50",
    "l": "late onset: rare before 50, steep rise after",
    "u": "uniform: similar at all ages",
}

_CATALOGUE = """
## Infectious and parasitic|a
A02||Other salmonella infections
A04||Other bacterial intestinal infections
A05||Other bacterial foodborne intoxications
A08|kp|Viral and other specified intestinal infections
A09|ku|Infectious gastroenteritis and colitis, unspecified
A15||Respiratory tuberculosis
A18||Tuberculosis of other organs
A37|p|Whooping cough
A38|p|Scarlet fever
A39||Meningococcal infection
A40||Streptococcal sepsis
A41|l|Other sepsis
A46||Erysipelas
A49|u|Bacterial infection of unspecified site
A51|y|Early syphilis
A54|y|Gonococcal infection
A56|yF|Other sexually transmitted chlamydial diseases
A59|yF|Trichomoniasis
A60|y|Anogenital herpesviral infection
A63|y|Other predominantly sexually transmitted diseases
A69||Other spirochetal infections
A87|p|Viral meningitis
B00|u|Herpesviral [herpes simplex] infections
B01|p|Varicella [chickenpox]
B02|l|Zoster [herpes zoster]
B05|p|Measles
B06|p|Rubella
B07|p|Viral warts
B08|p|Other viral infections with skin and mucous membrane lesions
B15||Acute hepatitis A
B16||Acute hepatitis B
B18|c|Chronic viral hepatitis
B20|cM|Human immunodeficiency virus [HIV] disease
B26|p|Mumps
B27|y|Infectious mononucleosis
B30|p|Viral conjunctivitis
B34|kp|Viral infection of unspecified site
B35|u|Dermatophytosis
B36|u|Other superficial mycoses
B37|F|Candidiasis
B44||Aspergillosis
B59||Pneumocystosis
B80|p|Enterobiasis
B85|p|Pediculosis and phthiriasis
B86|u|Scabies
B95|u|Streptococcus, staphylococcus and enterococcus as the cause of diseases
B96|u|Other bacterial agents as the cause of diseases
B97|u|Viral agents as the cause of diseases
## Neoplasms|l
C15|cM|Malignant neoplasm of esophagus
C16|cM|Malignant neoplasm of stomach
C18|c|Malignant neoplasm of colon
C20|c|Malignant neoplasm of rectum
C22|cM|Malignant neoplasm of liver and intrahepatic bile ducts
C25|c|Malignant neoplasm of pancreas
C32|cM|Malignant neoplasm of larynx
C34|c|Malignant neoplasm of bronchus and lung
C40|cy|Malignant neoplasm of bone and articular cartilage of limbs
C43|c|Malignant melanoma of skin
C44|c|Other and unspecified malignant neoplasm of skin
C49|c|Malignant neoplasm of other connective and soft tissue
C50|cF|Malignant neoplasm of breast
C51|cf|Malignant neoplasm of vulva
C53|cfd|Malignant neoplasm of cervix uteri
C54|cf|Malignant neoplasm of corpus uteri
C56|cf|Malignant neoplasm of ovary
C61|cm|Malignant neoplasm of prostate
C62|cmy|Malignant neoplasm of testis
C64|cM|Malignant neoplasm of kidney, except renal pelvis
C67|cM|Malignant neoplasm of bladder
C71|c|Malignant neoplasm of brain
C73|cFd|Malignant neoplasm of thyroid gland
C77|c|Secondary and unspecified malignant neoplasm of lymph nodes
C78|c|Secondary malignant neoplasm of respiratory and digestive organs
C79|c|Secondary malignant neoplasm of other and unspecified sites
C81|cy|Hodgkin lymphoma
C82|c|Follicular lymphoma
C83|c|Non-follicular lymphoma
C85|c|Other and unspecified types of non-Hodgkin lymphoma
C90|c|Multiple myeloma and malignant plasma cell neoplasms
C91|cp|Lymphoid leukemia
C92|c|Myeloid leukemia
D03|d|Melanoma in situ
D05|fd|Carcinoma in situ of breast
D06|fo|Carcinoma in situ of cervix uteri
D12|k|Benign neoplasm of colon, rectum, anus and anal canal
D17|d|Benign lipomatous neoplasm
D18|p|Hemangioma and lymphangioma, any site
D22|u|Melanocytic nevi
D23|d|Other benign neoplasms of skin
D24|fd|Benign neoplasm of breast
D25|fd|Leiomyoma of uterus
D27|fo|Benign neoplasm of ovary
D29|m|Benign neoplasm of male genital organs
D32|F|Benign neoplasm of meninges
D34|Fd|Benign neoplasm of thyroid gland
D48||Neoplasm of uncertain behavior of other and unspecified sites
D49||Neoplasms of unspecified behavior
## Blood and immune|a
D50|kF|Iron deficiency anemia
D51|l|Vitamin B12 deficiency anemia
D56|cp|Thalassemia
D57|cp|Sickle-cell disorders
D59||Acquired hemolytic anemia
D61||Other aplastic anemias and other bone marrow failure syndromes
D62|l|Acute posthemorrhagic anemia
D63|cl|Anemia in chronic diseases classified elsewhere
D64|l|Other anemias
D65|l|Disseminated intravascular coagulation [defibrination syndrome]
D66|cmp|Hereditary factor VIII deficiency
D68|c|Other coagulation defects
D69|u|Purpura and other hemorrhagic conditions
D70||Neutropenia
D72|u|Other disorders of white blood cells
D73||Diseases of spleen
D75||Other and unspecified diseases of blood and blood-forming organs
D80|cp|Immunodeficiency with predominantly antibody defects
D84|c|Other immunodeficiencies
D86|cd|Sarcoidosis
D89|c|Other disorders involving the immune mechanism, not elsewhere classified
## Endocrine and metabolic|a
E03|ckF|Other hypothyroidism
E04|Fd|Other nontoxic goiter
E05|cF|Thyrotoxicosis [hyperthyroidism]
E06|Fd|Thyroiditis
E07|F|Other disorders of thyroid
E10|cp|Type 1 diabetes mellitus
E11|ck|Type 2 diabetes mellitus
E13|c|Other specified diabetes mellitus
E16||Other disorders of pancreatic internal secretion
E21|cFd|Hyperparathyroidism and other disorders of parathyroid gland
E23|c|Hypofunction and other disorders of the pituitary gland
E24|F|Cushing's syndrome
E27||Other disorders of adrenal gland
E28|cfo|Ovarian dysfunction
E29|cm|Testicular dysfunction
E30|p|Disorders of puberty, not elsewhere classified
E34||Other endocrine disorders
E44|l|Protein-calorie malnutrition of moderate and mild degree
E46|l|Unspecified protein-calorie malnutrition
E53||Deficiency of other B group vitamins
E55|k|Vitamin D deficiency
E66|ck|Overweight and obesity
E72|cp|Other disorders of amino-acid metabolism
E78|ck|Disorders of lipoprotein metabolism and other lipidemias
E79|cM|Disorders of purine and pyrimidine metabolism
E83||Disorders of mineral metabolism
E84|cp|Cystic fibrosis
E85|cl|Amyloidosis
E86|u|Volume depletion
E87|l|Other disorders of fluid, electrolyte and acid-base balance
E88|c|Other and unspecified metabolic disorders
## Mental and behavioural|y
F01|cl|Vascular dementia
F03|cl|Unspecified dementia
F05|l|Delirium due to known physiological condition
F06|a|Other mental disorders due to known physiological condition
F10|cM|Alcohol related disorders
F11|cM|Opioid related disorders
F12|M|Cannabis related disorders
F14|M|Cocaine related disorders
F17|cka|Nicotine dependence
F19|M|Other psychoactive substance related disorders
F20|cM|Schizophrenia
F25|c|Schizoaffective disorders
F29||Unspecified psychosis not due to a substance or known physiological condition
F31|c|Bipolar disorder
F32|kF|Major depressive disorder, single episode
F33|cF|Major depressive disorder, recurrent
F34|cF|Persistent mood [affective] disorders
F40|F|Phobic anxiety disorders
F41|ckF|Other anxiety disorders
F42|c|Obsessive-compulsive disorder
F43|kF|Reaction to severe stress, and adjustment disorders
F44|F|Dissociative and conversion disorders
F45|F|Somatoform disorders
F48||Other nonpsychotic mental disorders
F50|cF|Eating disorders
F51|a|Sleep disorders not due to a substance or known physiological condition
F52|Ma|Sexual dysfunction not due to a substance or known physiological condition
F60|c|Specific personality disorders
F64||Gender identity disorders
F70|cp|Mild intellectual disabilities
F79|cp|Unspecified intellectual disabilities
F80|Mp|Specific developmental disorders of speech and language
F81|Mp|Specific developmental disorders of scholastic skills
F82|p|Specific developmental disorder of motor function
F84|cMp|Pervasive developmental disorders
F88|p|Other disorders of psychological development
F90|cMp|Attention-deficit hyperactivity disorders
F91|Mp|Conduct disorders
F93|p|Emotional disorders with onset specific to childhood
F95|Mp|Tic disorder
F98|p|Other behavioral and emotional disorders with onset in childhood and adolescence
F99||Mental disorder, not otherwise specified
## Nervous system|a
G00|p|Bacterial meningitis, not elsewhere classified
G03|u|Meningitis due to other and unspecified causes
G04|u|Encephalitis, myelitis and encephalomyelitis
G10|cd|Huntington's disease
G12|cp|Spinal muscular atrophy and related syndromes
G20|cMl|Parkinson's disease
G25|l|Other extrapyramidal and movement disorders
G30|cl|Alzheimer's disease
G31|cl|Other degenerative diseases of nervous system, not elsewhere classified
G35|cFy|Multiple sclerosis
G40|cp|Epilepsy and recurrent seizures
G43|ckFy|Migraine
G44|F|Other headache syndromes
G45|l|Transient cerebral ischemic attacks and related syndromes
G47|ckM|Sleep disorders
G50|Fd|Disorders of trigeminal nerve
G51||Facial nerve disorders
G54||Nerve root and plexus disorders
G56|Fd|Mononeuropathies of upper limb
G57||Mononeuropathies of lower limb
G60|c|Hereditary and idiopathic neuropathy
G62|cl|Other and unspecified polyneuropathies
G70|c|Myasthenia gravis and other myoneural disorders
G71|cMp|Primary disorders of muscles
G80|cp|Cerebral palsy
G81|cl|Hemiplegia and hemiparesis
G82|c|Paraplegia (paraparesis) and quadriplegia (quadriparesis)
G89|c|Pain, not elsewhere classified
G90||Disorders of autonomic nervous system
G91|p|Hydrocephalus
G93||Other disorders of brain
G95||Other and unspecified diseases of spinal cord
## Eye and adnexa|a
H00|u|Hordeolum and chalazion
H01|u|Other inflammation of eyelid
H02|l|Other disorders of eyelid
H04||Disorders of lacrimal system
H10|kp|Conjunctivitis
H11||Other disorders of conjunctiva
H18||Other disorders of cornea
H20||Iridocyclitis
H25|l|Age-related cataract
H26|l|Other cataract
H33||Retinal detachments and breaks
H34|l|Retinal vascular occlusions
H35|cl|Other retinal disorders
H36|cl|Retinal disorders in diseases classified elsewhere
H40|cl|Glaucoma
H43|l|Disorders of vitreous body
H50|p|Other strabismus
H52|k|Disorders of refraction and accommodation
H53||Visual disturbances
H54|cl|Blindness and low vision
H57||Other disorders of eye and adnexa
## Ear and mastoid|a
H60|u|Otitis externa
H61|u|Other disorders of external ear
H65|p|Nonsuppurative otitis media
H66|kp|Suppurative and unspecified otitis media
H68|p|Eustachian salpingitis and obstruction
H69||Other and unspecified disorders of Eustachian tube
H72||Perforation of tympanic membrane
H81|F|Disorders of vestibular function
H83||Other diseases of inner ear
H90|cl|Conductive and sensorineural hearing loss
H91|l|Other and unspecified hearing loss
H92|u|Otalgia and effusion of ear
H93||Other disorders of ear, not elsewhere classified
## Circulatory system|l
I01|p|Rheumatic fever with heart involvement
I05|cF|Rheumatic mitral valve diseases
I10|cka|Essential (primary) hypertension
I11|c|Hypertensive heart disease
I12|c|Hypertensive chronic kidney disease
I13|c|Hypertensive heart and chronic kidney disease
I15|ca|Secondary hypertension
I16||Hypertensive crisis
I20|cM|Angina pectoris
I21|M|Acute myocardial infarction
I24|M|Other acute ischemic heart diseases
I25|cM|Chronic ischemic heart disease
I26||Pulmonary embolism
I27|c|Other pulmonary heart diseases
I30|y|Acute pericarditis
I31||Other diseases of pericardium
I33||Acute and subacute endocarditis
I34|c|Nonrheumatic mitral valve disorders
I35|c|Nonrheumatic aortic valve disorders
I40|y|Acute myocarditis
I42|cM|Cardiomyopathy
I44||Atrioventricular and left bundle-branch block
I45||Other conduction disorders
I47|a|Paroxysmal tachycardia
I48|c|Atrial fibrillation and flutter
I49|a|Other cardiac arrhythmias
I50|c|Heart failure
I61||Nontraumatic intracerebral hemorrhage
I63||Cerebral infarction
I65||Occlusion and stenosis of precerebral arteries
I67||Other cerebrovascular diseases
I69|c|Sequelae of cerebrovascular disease
I70|c|Atherosclerosis
I71|M|Aortic aneurysm and dissection
I73|c|Other peripheral vascular diseases
I74||Arterial embolism and thrombosis
I77||Other disorders of arteries and arterioles
I80||Phlebitis and thrombophlebitis
I82||Other venous embolism and thrombosis
I83|Fd|Varicose veins of lower extremities
I87||Other disorders of veins
I89||Other noninfective disorders of lymphatic vessels and lymph nodes
I95||Hypotension
## Respiratory system|a
J00|kp|Acute nasopharyngitis [common cold]
J01|k|Acute sinusitis
J02|kp|Acute pharyngitis
J03|p|Acute tonsillitis
J04|u|Acute laryngitis and tracheitis
J05|p|Acute obstructive laryngitis [croup] and epiglottitis
J06|kp|Acute upper respiratory infections of multiple and unspecified sites
J09|u|Influenza due to certain identified influenza viruses
J10|u|Influenza due to other identified influenza virus
J11|u|Influenza due to unidentified influenza virus
J12|l|Viral pneumonia, not elsewhere classified
J13|l|Pneumonia due to Streptococcus pneumoniae
J15|l|Bacterial pneumonia, not elsewhere classified
J18|l|Pneumonia, unspecified organism
J20|ku|Acute bronchitis
J21|p|Acute bronchiolitis
J30|cky|Vasomotor and allergic rhinitis
J31||Chronic rhinitis, nasopharyngitis and pharyngitis
J32|c|Chronic sinusitis
J33||Nasal polyp
J34||Other and unspecified disorders of nose and nasal sinuses
J35|p|Chronic diseases of tonsils and adenoids
J38||Diseases of vocal cords and larynx, not elsewhere classified
J39||Other diseases of upper respiratory tract
J40|u|Bronchitis, not specified as acute or chronic
J43|cl|Emphysema
J44|cl|Other chronic obstructive pulmonary disease
J45|ckp|Asthma
J47|cl|Bronchiectasis
J69|l|Pneumonitis due to solids and liquids
J84|cl|Other interstitial pulmonary diseases
J90|l|Pleural effusion, not elsewhere classified
J93|My|Pneumothorax and air leak
J96|l|Respiratory failure, not elsewhere classified
J98||Other respiratory disorders
## Digestive system|a
K01|y|Embedded and impacted teeth
K02|p|Dental caries
K04||Diseases of pulp and periapical tissues
K05||Gingivitis and periodontal diseases
K08||Other disorders of teeth and supporting structures
K12|u|Stomatitis and related lesions
K20||Esophagitis
K21|ck|Gastro-esophageal reflux disease
K22||Other diseases of esophagus
K25||Gastric ulcer
K26|M|Duodenal ulcer
K29||Gastritis and duodenitis
K30||Functional dyspepsia
K31||Other diseases of stomach and duodenum
K35|y|Acute appendicitis
K40|M|Inguinal hernia
K42||Umbilical hernia
K43||Ventral hernia
K44|l|Diaphragmatic hernia
K50|cy|Crohn's disease [regional enteritis]
K51|cy|Ulcerative colitis
K52|u|Other and unspecified noninfective gastroenteritis and colitis
K56|l|Paralytic ileus and intestinal obstruction without hernia
K57|l|Diverticular disease of intestine
K58|cFy|Irritable bowel syndrome
K59|ku|Other functional intestinal disorders
K60||Fissure and fistula of anal and rectal regions
K61||Abscess of anal and rectal regions
K62||Other diseases of anus and rectum
K63||Other diseases of intestine
K64||Hemorrhoids and perianal venous thrombosis
K70|cM|Alcoholic liver disease
K74|c|Fibrosis and cirrhosis of liver
K75||Other inflammatory liver diseases
K76|c|Other diseases of liver
K80|F|Cholelithiasis
K81|F|Cholecystitis
K85||Acute pancreatitis
K86|c|Other diseases of pancreas
K90|c|Intestinal malabsorption
K92|l|Other diseases of digestive system
## Skin and subcutaneous tissue|u
L01|p|Impetigo
L02|k|Cutaneous abscess, furuncle and carbuncle
L03|k|Cellulitis and acute lymphangitis
L05|My|Pilonidal cyst and sinus
L08||Other local infections of skin and subcutaneous tissue
L20|cp|Atopic dermatitis
L21|p|Seborrheic dermatitis
L22|p|Diaper dermatitis
L23||Allergic contact dermatitis
L24||Irritant contact dermatitis
L25||Unspecified contact dermatitis
L29|l|Pruritus
L30|k|Other and unspecified dermatitis
L40|ca|Psoriasis
L43||Lichen planus
L50||Urticaria
L57|l|Skin changes due to chronic exposure to nonionizing radiation
L60||Nail disorders
L63|y|Alopecia areata
L65|F|Other nonscarring hair loss
L70|ky|Acne
L71|Fd|Rosacea
L72||Follicular cysts of skin and subcutaneous tissue
L73|y|Other follicular disorders
L81||Other disorders of pigmentation
L82|l|Seborrheic keratosis
L84|l|Corns and callosities
L89|l|Pressure ulcer
L97|cl|Non-pressure chronic ulcer of lower limb, not elsewhere classified
L98||Other disorders of skin and subcutaneous tissue, not elsewhere classified
## Musculoskeletal and connective tissue|a
M00||Pyogenic arthritis
M05|cF|Rheumatoid arthritis with rheumatoid factor
M06|cF|Other rheumatoid arthritis
M08|cp|Juvenile arthritis
M10|cM|Gout
M15|cl|Polyosteoarthritis
M16|cl|Osteoarthritis of hip
M17|ckl|Osteoarthritis of knee
M19|l|Other and unspecified osteoarthritis
M21||Other acquired deformities of limbs
M22|y|Disorder of patella
M23|y|Internal derangement of knee
M24||Other specific joint derangements
M25|k|Other joint disorder, not elsewhere classified
M32|cFy|Systemic lupus erythematosus
M35|cF|Other systemic involvement of connective tissue
M41|Fp|Scoliosis
M43||Other deforming dorsopathies
M47|l|Spondylosis
M48|l|Other spondylopathies
M50|d|Cervical disc disorders
M51|d|Thoracic, thoracolumbar, and lumbosacral intervertebral disc disorders
M53||Other and unspecified dorsopathies, not elsewhere classified
M54|k|Dorsalgia
M62||Other disorders of muscle
M65||Synovitis and tenosynovitis
M67||Other disorders of synovium and tendon
M70||Soft tissue disorders related to use, overuse and pressure
M71||Other bursopathies
M72|d|Fibroblastic disorders
M75|d|Shoulder lesions
M76||Enthesopathies, lower limb, excluding foot
M77||Other enthesopathies
M79|k|Other and unspecified soft tissue disorders, not elsewhere classified
M80|Fl|Osteoporosis with current pathological fracture
M81|cFl|Osteoporosis without current pathological fracture
M84||Disorder of continuity of bone
M85|Fl|Other disorders of bone density and structure
M86||Osteomyelitis
M99||Biomechanical lesions, not elsewhere classified
## Genitourinary system|a
N02|u|Recurrent and persistent hematuria
N04|cp|Nephrotic syndrome
N17|l|Acute kidney failure
N18|cl|Chronic kidney disease (CKD)
N19|l|Unspecified kidney failure
N20|M|Calculus of kidney and ureter
N23||Unspecified renal colic
N25|c|Disorders resulting from impaired renal tubular function
N28||Other disorders of kidney and ureter, not elsewhere classified
N30|F|Cystitis
N31|l|Neuromuscular dysfunction of bladder
N32|l|Other disorders of bladder
N39|kF|Other disorders of urinary system
N40|cml|Benign prostatic hyperplasia
N41|m|Inflammatory diseases of prostate
N42|ml|Other and unspecified disorders of prostate
N43|m|Hydrocele and spermatocele
N44|mp|Noninflammatory disorders of testis
N45|my|Orchitis and epididymitis
N46|mo|Male infertility
N47|mp|Disorders of prepuce
N52|cml|Male erectile dysfunction
N60|fo|Benign mammary dysplasia
N61|F|Inflammatory disorders of breast
N63|Fd|Unspecified lump in breast
N64|F|Other disorders of breast
N70|fo|Salpingitis and oophoritis
N73|fo|Other female pelvic inflammatory diseases
N76|fo|Other inflammation of vagina and vulva
N80|cfo|Endometriosis
N81|fl|Female genital prolapse
N83|fo|Noninflammatory disorders of ovary, fallopian tube and broad ligament
N84|fo|Polyp of female genital tract
N85|fd|Other noninflammatory disorders of uterus, except cervix
N87|fo|Dysplasia of cervix uteri
N89|fo|Other noninflammatory disorders of vagina
N92|fo|Excessive, frequent and irregular menstruation
N93|fo|Other abnormal uterine and vaginal bleeding
N94|fo|Pain and other conditions associated with female genital organs and menstrual cycle
N95|fd|Menopausal and other perimenopausal disorders
N97|fo|Female infertility
## Pregnancy and childbirth|o
O02|f|Other abnormal products of conception
O03|f|Spontaneous abortion
O09|f|Supervision of high risk pregnancy
O10|f|Pre-existing hypertension complicating pregnancy, childbirth and the puerperium
O13|f|Gestational [pregnancy-induced] hypertension without significant proteinuria
O14|f|Pre-eclampsia
O20|f|Hemorrhage in early pregnancy
O21|f|Excessive vomiting in pregnancy
O24|f|Diabetes mellitus in pregnancy, childbirth, and the puerperium
O26|f|Maternal care for other conditions predominantly related to pregnancy
O34|f|Maternal care for abnormality of pelvic organs
O36|f|Maternal care for other fetal problems
O42|f|Premature rupture of membranes
O47|f|False labor
O48|f|Late pregnancy
O60|f|Preterm labor
O62|f|Abnormalities of forces of labor
O70|f|Perineal laceration during delivery
O80|f|Encounter for full-term uncomplicated delivery
O99|f|Other maternal diseases complicating pregnancy, childbirth and the puerperium
## Perinatal|n
P05||Disorders of newborn related to slow fetal growth and fetal malnutrition
P07||Disorders of newborn related to short gestation and low birth weight
P22||Respiratory distress of newborn
P28||Other respiratory conditions originating in the perinatal period
P36||Bacterial sepsis of newborn
P39||Other infections specific to the perinatal period
P55||Hemolytic disease of newborn
P59||Neonatal jaundice from other and unspecified causes
P70||Transitory disorders of carbohydrate metabolism specific to newborn
P92||Feeding problems of newborn
P96||Other conditions originating in the perinatal period
## Congenital|p
Q03|c|Congenital hydrocephalus
Q05|c|Spina bifida
Q21|c|Congenital malformations of cardiac septa
Q23|c|Congenital malformations of aortic and mitral valves
Q25|c|Congenital malformations of great arteries
Q35||Cleft palate
Q37||Cleft palate with cleft lip
Q38||Other congenital malformations of tongue, mouth and pharynx
Q53|m|Undescended and ectopic testicle
Q54|m|Hypospadias
Q62||Congenital obstructive defects of renal pelvis and malformations of ureter
Q65|F|Congenital deformities of hip
Q66||Congenital deformities of feet
Q67||Congenital musculoskeletal deformities of head, face, spine and chest
Q82||Other congenital malformations of skin
Q90|c|Down syndrome
Q96|cf|Turner's syndrome
Q98|cm|Other sex chromosome abnormalities, male phenotype
## Symptoms and signs|u
R00||Abnormalities of heart beat
R01|p|Cardiac murmurs and other cardiac sounds
R03|a|Abnormal blood-pressure reading, without diagnosis
R04||Hemorrhage from respiratory passages
R05|k|Cough
R06|k|Abnormalities of breathing
R07|k|Pain in throat and chest
R09||Other symptoms and signs involving the circulatory and respiratory system
R10|kF|Abdominal and pelvic pain
R11|k|Nausea and vomiting
R13|l|Aphagia and dysphagia
R19||Other symptoms and signs involving the digestive system and abdomen
R21|p|Rash and other nonspecific skin eruption
R25||Abnormal involuntary movements
R26|l|Abnormalities of gait and mobility
R31|l|Hematuria
R32|Fl|Unspecified urinary incontinence
R35|l|Polyuria
R39|l|Other and unspecified symptoms and signs involving the genitourinary system
R41|l|Other symptoms and signs involving cognitive functions and awareness
R42|k|Dizziness and giddiness
R50|kp|Fever of other and unknown origin
R51|F|Headache
R53|k|Malaise and fatigue
R55||Syncope and collapse
R56|p|Convulsions, not elsewhere classified
R60|l|Edema, not elsewhere classified
R62|p|Lack of expected normal physiological development in childhood and adults
R63||Symptoms and signs concerning food and fluid intake
R73|a|Elevated blood glucose level
R79|a|Other abnormal findings of blood chemistry
R91|l|Abnormal findings on diagnostic imaging of lung
R94|a|Abnormal results of function studies
## Injury and poisoning|u
S00|p|Superficial injury of head
S01|p|Open wound of head
S06||Intracranial injury
S09||Other and unspecified injuries of head
S13|y|Dislocation and sprain of joints and ligaments at neck level
S22|l|Fracture of rib(s), sternum and thoracic spine
S32|l|Fracture of lumbar spine and pelvis
S39||Other and unspecified injuries of abdomen, lower back, pelvis and external genitals
S42||Fracture of shoulder and upper arm
S43|My|Dislocation and sprain of joints and ligaments of shoulder girdle
S52|p|Fracture of forearm
S60||Superficial injury of wrist, hand and fingers
S61|M|Open wound of wrist, hand and fingers
S62|My|Fracture at wrist and hand level
S63|y|Dislocation and sprain of joints and ligaments at wrist and hand level
S72|Fl|Fracture of femur
S82||Fracture of lower leg, including ankle
S83|y|Dislocation and sprain of joints and ligaments of knee
S86|y|Injury of muscle, fascia and tendon at lower leg level
S92||Fracture of foot and toe, except ankle
S93|ky|Dislocation and sprain of joints and ligaments at ankle, foot and toe level
T14||Injury of unspecified body region
T15||Foreign body on external surface of eye
T18|p|Foreign body in alimentary tract
T20||Burn and corrosion of head, face, and neck
T39||Poisoning by nonopioid analgesics, antipyretics and antirheumatics
T40|y|Poisoning by narcotics and psychodysleptics [hallucinogens]
T42||Poisoning by antiepileptic, sedative-hypnotic and antiparkinsonism drugs
T43|y|Poisoning by psychotropic drugs, not elsewhere classified
T50||Poisoning by diuretics and other and unspecified drugs and biological substances
T63||Toxic effect of contact with venomous animals and plants
T67||Effects of heat and light
T78||Adverse effects, not elsewhere classified
T81|l|Complications of procedures, not elsewhere classified
T84|l|Complications of internal orthopedic prosthetic devices, implants and grafts
T86|c|Complications of transplanted organs and tissue
"""


@dataclass(frozen=True)
class Condition:
    """One consolidated condition (one row of ``metadata/codes.parquet``)."""

    condition_id: int
    code: str  # ICD-10-CM three-character category
    system: str  # organ system (ICD-10-CM chapter, shortened)
    title: str  # category title
    chronic: bool
    common: bool
    sex: str | None  # "female" / "male" for anatomically sex-specific conditions
    sex_bias: int  # +1 female-predominant, -1 male-predominant, 0 neither
    profile: str  # key of AGE_PROFILES

    @property
    def name(self) -> str:
        return f"{self.system}: {self.title}"

    @property
    def paediatric(self) -> bool:
        return self.profile in ("p", "n")

    @property
    def late_onset(self) -> bool:
        return self.profile == "l"


_FLAG_LETTERS = set("ckfmFM") | set(AGE_PROFILES)


def _parse(text: str) -> tuple[Condition, ...]:
    conditions: list[Condition] = []
    system, default_profile = "", "a"
    for line_no, line in enumerate(text.strip().splitlines(), start=1):
        if line.startswith("## "):
            system, default_profile = line[3:].split("|")
            continue
        code, flags, title = line.split("|")
        unknown = set(flags) - _FLAG_LETTERS
        profiles = [f for f in flags if f in AGE_PROFILES]
        if unknown or len(profiles) > 1 or ("f" in flags and "m" in flags):
            raise ValueError(f"conditions catalogue line {line_no} ({code}): bad flags {flags!r}")
        sex = "female" if "f" in flags else "male" if "m" in flags else None
        conditions.append(
            Condition(
                condition_id=len(conditions),
                code=code,
                system=system,
                title=title,
                chronic="c" in flags,
                common="k" in flags,
                sex=sex,
                sex_bias=1 if "F" in flags else -1 if "M" in flags else 0,
                profile=profiles[0] if profiles else default_profile,
            )
        )
    return tuple(conditions)


CONDITIONS: tuple[Condition, ...] = _parse(_CATALOGUE)
if len(CONDITIONS) != N_CONDITIONS or len({c.code for c in CONDITIONS}) != N_CONDITIONS:
    raise RuntimeError(
        f"conditions catalogue: expected {N_CONDITIONS} unique codes, "
        f"got {len(CONDITIONS)} rows and {len({c.code for c in CONDITIONS})} unique codes"
    )
SYSTEMS: tuple[str, ...] = tuple(dict.fromkeys(c.system for c in CONDITIONS))

# The head of the frequency distribution, most frequent first (typical US claims rankings),
# for chronic and acute conditions separately; the simulator gives these its largest
# prevalences in this order. Other "common" conditions follow in seed-drawn order.
MOST_COMMON_CHRONIC = ("I10", "E78", "E11", "E66", "K21", "F41", "J45", "E03", "M17", "J30")
MOST_COMMON_ACUTE = (
    "J06", "M54", "M25", "R10", "J02", "N39", "H66", "J01", "R05", "M79", "J20", "F32", "L30",
    "R53", "B34", "R07", "A09", "J00", "F43",
)  # fmt: skip
BY_CODE: dict[str, Condition] = {c.code: c for c in CONDITIONS}
