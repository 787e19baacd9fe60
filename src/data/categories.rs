//! Subject → category maps of the three multiple-choice benchmarks (MMLU, CMMLU, MMLU-Pro),
//! held as plain const tables, with the project's "medical" flags.
//!
//! Subject names are the dataset's own file names: MMLU `test/<subject>_test.csv` (57),
//! CMMLU `test/<subject>.csv` (67), and MMLU-Pro's 14 `category` values (note
//! `"computer science"` with a space).
//!
//! Rules and sources:
//!
//! - **MMLU category** follows lm-evaluation-harness (`lm_eval/tasks/mmlu/_generate_configs.py`,
//!   `SUBJECTS`): `stem` / `humanities` / `social_sciences` / `other`, 19 / 13 / 12 / 13 subjects.
//!   This puts `anatomy` in `stem`; the original hendrycks/test `categories.py` files it under
//!   "other" via its "health" subcategory (18 / 13 / 12 / 14).
//! - **CMMLU category** is the primary group of haonan-li/CMMLU `src/categories.py` (the group
//!   of a subject's first subcategory): `STEM` / `Humanities` / `Social Science` / `Other`,
//!   17 / 13 / 22 / 15. The 15 subjects that also carry the "china specific" subcategory have
//!   [`SubjectInfo::china_specific`] set; the flag is always false for MMLU and MMLU-Pro.
//! - **MMLU-Pro category** is the category itself.
//! - **`medical`** (core) and **`medical_ext`** (extended, a superset of core):
//!   - MMLU core = the 6 MMLU subjects of lm-eval's MultiMedQA group
//!     (`lm_eval/tasks/benchmarks/multimedqa/multimedqa.yaml`): anatomy, clinical_knowledge,
//!     college_biology, college_medicine, medical_genetics, professional_medicine. Extended adds
//!     high_school_biology, human_aging, nutrition, virology (= the "health" + "biology"
//!     subcategories of hendrycks/test `categories.py`), 10 in all.
//!   - CMMLU core (our selection by subject matter, names from `src/categories.py`): anatomy,
//!     clinical_knowledge, college_medical_statistics, college_medicine, genetics, nutrition,
//!     professional_medicine, traditional_chinese_medicine, virology. Extended adds
//!     high_school_biology, food_science, human_sexuality, sports_science, 13 in all.
//!   - MMLU-Pro core = `health`; extended = `health` + `biology`.
//! - **CMMLU Chinese names** ([`cmmlu_chinese_name`]) are those of lm-evaluation-harness
//!   `lm_eval/tasks/cmmlu/_generate_configs.py` (`SUBJECTS`, used in the task descriptions
//!   "以下是关于{name}的单项选择题，请直接给出正确答案的选项。"), identical to `name_en2zh` in
//!   haonan-li/CMMLU `src/categories.py`.

/// What the project knows about one subject of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectInfo {
    /// Primary group: MMLU `stem`/`humanities`/`social_sciences`/`other`; CMMLU
    /// `STEM`/`Humanities`/`Social Science`/`Other`; MMLU-Pro the category itself.
    pub category: &'static str,
    /// In the core medical list (see the module docs).
    pub medical: bool,
    /// In the extended medical list, a superset of the core list.
    pub medical_ext: bool,
    /// One of CMMLU's 15 "China specific" subjects; always false for MMLU and MMLU-Pro.
    pub china_specific: bool,
}

/// Medical membership of a subject, to keep the tables short.
#[derive(Clone, Copy)]
enum Med {
    /// Not medical.
    No,
    /// Extended list only.
    Ext,
    /// Core list (and hence also extended).
    Core,
}

const fn info(category: &'static str, med: Med, china_specific: bool) -> SubjectInfo {
    SubjectInfo {
        category,
        medical: matches!(med, Med::Core),
        medical_ext: matches!(med, Med::Core | Med::Ext),
        china_specific,
    }
}

// MMLU groups (lm-evaluation-harness).
const STEM: &str = "stem";
const HUMANITIES: &str = "humanities";
const SOCIAL_SCIENCES: &str = "social_sciences";
const OTHER: &str = "other";

// CMMLU primary groups (haonan-li/CMMLU `src/categories.py`).
const C_STEM: &str = "STEM";
const C_HUMANITIES: &str = "Humanities";
const C_SOCIAL_SCIENCE: &str = "Social Science";
const C_OTHER: &str = "Other";

// All tables are sorted by name (byte order), which the lookups rely on.

const MMLU: &[(&str, SubjectInfo)] = &[
    ("abstract_algebra", info(STEM, Med::No, false)),
    ("anatomy", info(STEM, Med::Core, false)),
    ("astronomy", info(STEM, Med::No, false)),
    ("business_ethics", info(OTHER, Med::No, false)),
    ("clinical_knowledge", info(OTHER, Med::Core, false)),
    ("college_biology", info(STEM, Med::Core, false)),
    ("college_chemistry", info(STEM, Med::No, false)),
    ("college_computer_science", info(STEM, Med::No, false)),
    ("college_mathematics", info(STEM, Med::No, false)),
    ("college_medicine", info(OTHER, Med::Core, false)),
    ("college_physics", info(STEM, Med::No, false)),
    ("computer_security", info(STEM, Med::No, false)),
    ("conceptual_physics", info(STEM, Med::No, false)),
    ("econometrics", info(SOCIAL_SCIENCES, Med::No, false)),
    ("electrical_engineering", info(STEM, Med::No, false)),
    ("elementary_mathematics", info(STEM, Med::No, false)),
    ("formal_logic", info(HUMANITIES, Med::No, false)),
    ("global_facts", info(OTHER, Med::No, false)),
    ("high_school_biology", info(STEM, Med::Ext, false)),
    ("high_school_chemistry", info(STEM, Med::No, false)),
    ("high_school_computer_science", info(STEM, Med::No, false)),
    (
        "high_school_european_history",
        info(HUMANITIES, Med::No, false),
    ),
    (
        "high_school_geography",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    (
        "high_school_government_and_politics",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    (
        "high_school_macroeconomics",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    ("high_school_mathematics", info(STEM, Med::No, false)),
    (
        "high_school_microeconomics",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    ("high_school_physics", info(STEM, Med::No, false)),
    (
        "high_school_psychology",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    ("high_school_statistics", info(STEM, Med::No, false)),
    ("high_school_us_history", info(HUMANITIES, Med::No, false)),
    (
        "high_school_world_history",
        info(HUMANITIES, Med::No, false),
    ),
    ("human_aging", info(OTHER, Med::Ext, false)),
    ("human_sexuality", info(SOCIAL_SCIENCES, Med::No, false)),
    ("international_law", info(HUMANITIES, Med::No, false)),
    ("jurisprudence", info(HUMANITIES, Med::No, false)),
    ("logical_fallacies", info(HUMANITIES, Med::No, false)),
    ("machine_learning", info(STEM, Med::No, false)),
    ("management", info(OTHER, Med::No, false)),
    ("marketing", info(OTHER, Med::No, false)),
    ("medical_genetics", info(OTHER, Med::Core, false)),
    ("miscellaneous", info(OTHER, Med::No, false)),
    ("moral_disputes", info(HUMANITIES, Med::No, false)),
    ("moral_scenarios", info(HUMANITIES, Med::No, false)),
    ("nutrition", info(OTHER, Med::Ext, false)),
    ("philosophy", info(HUMANITIES, Med::No, false)),
    ("prehistory", info(HUMANITIES, Med::No, false)),
    ("professional_accounting", info(OTHER, Med::No, false)),
    ("professional_law", info(HUMANITIES, Med::No, false)),
    ("professional_medicine", info(OTHER, Med::Core, false)),
    (
        "professional_psychology",
        info(SOCIAL_SCIENCES, Med::No, false),
    ),
    ("public_relations", info(SOCIAL_SCIENCES, Med::No, false)),
    ("security_studies", info(SOCIAL_SCIENCES, Med::No, false)),
    ("sociology", info(SOCIAL_SCIENCES, Med::No, false)),
    ("us_foreign_policy", info(SOCIAL_SCIENCES, Med::No, false)),
    ("virology", info(OTHER, Med::Ext, false)),
    ("world_religions", info(HUMANITIES, Med::No, false)),
];

const CMMLU: &[(&str, &str, SubjectInfo)] = &[
    ("agronomy", "农学", info(C_OTHER, Med::No, false)),
    ("anatomy", "解剖学", info(C_STEM, Med::Core, false)),
    (
        "ancient_chinese",
        "古汉语",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    ("arts", "艺术学", info(C_HUMANITIES, Med::No, false)),
    ("astronomy", "天文学", info(C_STEM, Med::No, false)),
    (
        "business_ethics",
        "商业伦理",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "chinese_civil_service_exam",
        "中国公务员考试",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "chinese_driving_rule",
        "中国驾驶规则",
        info(C_OTHER, Med::No, true),
    ),
    (
        "chinese_food_culture",
        "中国饮食文化",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "chinese_foreign_policy",
        "中国外交政策",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "chinese_history",
        "中国历史",
        info(C_HUMANITIES, Med::No, true),
    ),
    (
        "chinese_literature",
        "中国文学",
        info(C_HUMANITIES, Med::No, true),
    ),
    (
        "chinese_teacher_qualification",
        "中国教师资格",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "clinical_knowledge",
        "临床知识",
        info(C_OTHER, Med::Core, false),
    ),
    (
        "college_actuarial_science",
        "大学精算学",
        info(C_STEM, Med::No, false),
    ),
    (
        "college_education",
        "大学教育学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "college_engineering_hydrology",
        "大学工程水文学",
        info(C_STEM, Med::No, false),
    ),
    (
        "college_law",
        "大学法律",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "college_mathematics",
        "大学数学",
        info(C_STEM, Med::No, false),
    ),
    (
        "college_medical_statistics",
        "大学医学统计",
        info(C_STEM, Med::Core, false),
    ),
    (
        "college_medicine",
        "大学医学",
        info(C_OTHER, Med::Core, false),
    ),
    (
        "computer_science",
        "计算机科学",
        info(C_STEM, Med::No, false),
    ),
    (
        "computer_security",
        "计算机安全",
        info(C_OTHER, Med::No, false),
    ),
    (
        "conceptual_physics",
        "概念物理学",
        info(C_STEM, Med::No, false),
    ),
    (
        "construction_project_management",
        "建设工程管理",
        info(C_OTHER, Med::No, true),
    ),
    (
        "economics",
        "经济学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "education",
        "教育学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "electrical_engineering",
        "电气工程",
        info(C_STEM, Med::No, false),
    ),
    (
        "elementary_chinese",
        "小学语文",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "elementary_commonsense",
        "小学常识",
        info(C_OTHER, Med::No, true),
    ),
    (
        "elementary_information_and_technology",
        "小学信息技术",
        info(C_OTHER, Med::No, false),
    ),
    (
        "elementary_mathematics",
        "初等数学",
        info(C_STEM, Med::No, false),
    ),
    ("ethnology", "民族学", info(C_SOCIAL_SCIENCE, Med::No, true)),
    ("food_science", "食品科学", info(C_OTHER, Med::Ext, false)),
    ("genetics", "遗传学", info(C_STEM, Med::Core, false)),
    (
        "global_facts",
        "全球事实",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "high_school_biology",
        "高中生物",
        info(C_STEM, Med::Ext, false),
    ),
    (
        "high_school_chemistry",
        "高中化学",
        info(C_STEM, Med::No, false),
    ),
    (
        "high_school_geography",
        "高中地理",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "high_school_mathematics",
        "高中数学",
        info(C_STEM, Med::No, false),
    ),
    (
        "high_school_physics",
        "高中物理学",
        info(C_STEM, Med::No, false),
    ),
    (
        "high_school_politics",
        "高中政治",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    (
        "human_sexuality",
        "人类性行为",
        info(C_OTHER, Med::Ext, false),
    ),
    (
        "international_law",
        "国际法学",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "journalism",
        "新闻学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "jurisprudence",
        "法理学",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "legal_and_moral_basis",
        "法律与道德基础",
        info(C_OTHER, Med::No, false),
    ),
    ("logical", "逻辑学", info(C_HUMANITIES, Med::No, false)),
    ("machine_learning", "机器学习", info(C_STEM, Med::No, false)),
    (
        "management",
        "管理学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "marketing",
        "市场营销",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "marxist_theory",
        "马克思主义理论",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "modern_chinese",
        "现代汉语",
        info(C_SOCIAL_SCIENCE, Med::No, true),
    ),
    ("nutrition", "营养学", info(C_OTHER, Med::Core, false)),
    ("philosophy", "哲学", info(C_HUMANITIES, Med::No, false)),
    (
        "professional_accounting",
        "专业会计",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "professional_law",
        "专业法学",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "professional_medicine",
        "专业医学",
        info(C_OTHER, Med::Core, false),
    ),
    (
        "professional_psychology",
        "专业心理学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "public_relations",
        "公共关系",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "security_study",
        "安全研究",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    (
        "sociology",
        "社会学",
        info(C_SOCIAL_SCIENCE, Med::No, false),
    ),
    ("sports_science", "体育学", info(C_OTHER, Med::Ext, false)),
    (
        "traditional_chinese_medicine",
        "中医中药",
        info(C_OTHER, Med::Core, true),
    ),
    ("virology", "病毒学", info(C_STEM, Med::Core, false)),
    (
        "world_history",
        "世界历史",
        info(C_HUMANITIES, Med::No, false),
    ),
    (
        "world_religions",
        "世界宗教",
        info(C_HUMANITIES, Med::No, false),
    ),
];

const MMLU_PRO: &[(&str, Med)] = &[
    ("biology", Med::Ext),
    ("business", Med::No),
    ("chemistry", Med::No),
    ("computer science", Med::No),
    ("economics", Med::No),
    ("engineering", Med::No),
    ("health", Med::Core),
    ("history", Med::No),
    ("law", Med::No),
    ("math", Med::No),
    ("other", Med::No),
    ("philosophy", Med::No),
    ("physics", Med::No),
    ("psychology", Med::No),
];

/// The MMLU subject's info (lm-eval category, medical flags), or `None` for an unknown name.
pub fn mmlu(subject: &str) -> Option<SubjectInfo> {
    MMLU.binary_search_by(|(name, _)| (*name).cmp(subject))
        .ok()
        .map(|i| MMLU[i].1)
}

/// The CMMLU subject's info (primary group, medical and China-specific flags), or `None`.
pub fn cmmlu(subject: &str) -> Option<SubjectInfo> {
    cmmlu_entry(subject).map(|(_, _, info)| *info)
}

/// The MMLU-Pro category's info (category = itself, medical flags), or `None`.
pub fn mmlu_pro(category: &str) -> Option<SubjectInfo> {
    MMLU_PRO
        .binary_search_by(|(name, _)| (*name).cmp(category))
        .ok()
        .map(|i| info(MMLU_PRO[i].0, MMLU_PRO[i].1, false))
}

/// All 57 MMLU subjects, in alphabetical order.
pub fn mmlu_subjects() -> impl Iterator<Item = &'static str> {
    MMLU.iter().map(|(name, _)| *name)
}

/// All 67 CMMLU subjects, in alphabetical order.
pub fn cmmlu_subjects() -> impl Iterator<Item = &'static str> {
    CMMLU.iter().map(|(name, _, _)| *name)
}

/// The subject's name in Chinese, as lm-evaluation-harness's CMMLU task descriptions use it
/// ("以下是关于{name}的单项选择题，请直接给出正确答案的选项。"), e.g. anatomy -> 解剖学.
pub fn cmmlu_chinese_name(subject: &str) -> Option<&'static str> {
    cmmlu_entry(subject).map(|(_, zh, _)| *zh)
}

fn cmmlu_entry(subject: &str) -> Option<&'static (&'static str, &'static str, SubjectInfo)> {
    CMMLU
        .binary_search_by(|(name, _, _)| (*name).cmp(subject))
        .ok()
        .map(|i| &CMMLU[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(infos: impl Iterator<Item = SubjectInfo>, category: &str) -> usize {
        infos.filter(|i| i.category == category).count()
    }

    fn mmlu_infos() -> impl Iterator<Item = SubjectInfo> {
        mmlu_subjects().map(|s| mmlu(s).unwrap())
    }

    fn cmmlu_infos() -> impl Iterator<Item = SubjectInfo> {
        cmmlu_subjects().map(|s| cmmlu(s).unwrap())
    }

    fn pro_infos() -> impl Iterator<Item = SubjectInfo> {
        MMLU_PRO.iter().map(|(name, _)| mmlu_pro(name).unwrap())
    }

    #[test]
    fn tables_are_strictly_sorted() {
        assert!(MMLU.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(CMMLU.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(MMLU_PRO.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn subject_counts() {
        assert_eq!(mmlu_subjects().count(), 57);
        assert_eq!(cmmlu_subjects().count(), 67);
        assert_eq!(MMLU_PRO.len(), 14);
    }

    #[test]
    fn mmlu_category_counts() {
        assert_eq!(count(mmlu_infos(), "stem"), 19);
        assert_eq!(count(mmlu_infos(), "humanities"), 13);
        assert_eq!(count(mmlu_infos(), "social_sciences"), 12);
        assert_eq!(count(mmlu_infos(), "other"), 13);
        assert!(mmlu_infos().all(|i| !i.china_specific));
    }

    #[test]
    fn cmmlu_category_counts() {
        assert_eq!(count(cmmlu_infos(), "STEM"), 17);
        assert_eq!(count(cmmlu_infos(), "Humanities"), 13);
        assert_eq!(count(cmmlu_infos(), "Social Science"), 22);
        assert_eq!(count(cmmlu_infos(), "Other"), 15);
        assert_eq!(cmmlu_infos().filter(|i| i.china_specific).count(), 15);
    }

    #[test]
    fn mmlu_pro_category_is_itself() {
        for (name, _) in MMLU_PRO {
            let info = mmlu_pro(name).unwrap();
            assert_eq!(info.category, *name);
            assert!(!info.china_specific);
        }
        assert!(mmlu_pro("computer science").is_some());
        assert!(mmlu_pro("computer_science").is_none());
    }

    #[test]
    fn spot_checks() {
        let anatomy = mmlu("anatomy").unwrap();
        assert_eq!(anatomy.category, "stem");
        assert!(anatomy.medical && anatomy.medical_ext);
        assert_eq!(
            mmlu("high_school_government_and_politics")
                .unwrap()
                .category,
            "social_sciences"
        );
        assert_eq!(mmlu("professional_law").unwrap().category, "humanities");
        let hsb = mmlu("high_school_biology").unwrap();
        assert!(!hsb.medical && hsb.medical_ext);
        assert!(mmlu("anatomy_test").is_none());
        assert!(mmlu("").is_none());

        let tcm = cmmlu("traditional_chinese_medicine").unwrap();
        assert_eq!(tcm.category, "Other");
        assert!(tcm.medical && tcm.china_specific);
        assert_eq!(cmmlu("chinese_history").unwrap().category, "Humanities");
        assert_eq!(cmmlu("security_study").unwrap().category, "Social Science");
        assert_eq!(cmmlu("virology").unwrap().category, "STEM");
        assert!(cmmlu("security_studies").is_none());

        assert_eq!(cmmlu_chinese_name("anatomy"), Some("解剖学"));
        assert_eq!(cmmlu_chinese_name("agronomy"), Some("农学"));
        assert_eq!(
            cmmlu_chinese_name("traditional_chinese_medicine"),
            Some("中医中药")
        );
        assert_eq!(cmmlu_chinese_name("nope"), None);

        assert_eq!(mmlu_subjects().next(), Some("abstract_algebra"));
        assert_eq!(mmlu_subjects().last(), Some("world_religions"));
        assert_eq!(cmmlu_subjects().next(), Some("agronomy"));
        assert_eq!(cmmlu_subjects().last(), Some("world_religions"));
    }

    #[test]
    fn medical_is_subset_of_medical_ext() {
        for info in mmlu_infos().chain(cmmlu_infos()).chain(pro_infos()) {
            assert!(!info.medical || info.medical_ext, "{info:?}");
        }
    }

    #[test]
    fn medical_counts() {
        let counts = |v: Vec<SubjectInfo>| {
            (
                v.iter().filter(|i| i.medical).count(),
                v.iter().filter(|i| i.medical_ext).count(),
            )
        };
        assert_eq!(counts(mmlu_infos().collect()), (6, 10));
        assert_eq!(counts(cmmlu_infos().collect()), (9, 13));
        assert_eq!(counts(pro_infos().collect()), (1, 2));
        assert!(mmlu_pro("health").unwrap().medical);
        assert!(mmlu_pro("biology").unwrap().medical_ext);
    }

    #[test]
    fn every_cmmlu_subject_has_a_chinese_name() {
        for s in cmmlu_subjects() {
            let zh = cmmlu_chinese_name(s).unwrap();
            assert!(!zh.is_empty() && !zh.is_ascii(), "{s}: {zh}");
        }
    }
}
