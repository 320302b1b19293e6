//! Flag rules that are not plain parsing.

use phi_trainer::args::{
    EvalStrategy, FinetuningType, LrSchedulerType, NormSurgery, Optim, Stage, TrainArgs,
};

fn args(flags: &[&str]) -> TrainArgs {
    let argv = ["phi-train"].iter().chain(flags).copied();
    TrainArgs::from_cli(argv).unwrap()
}

#[test]
fn gradient_checkpointing_defaults_on_for_lora_only_and_lf_switch_wins() {
    let on = |f: &[&str]| args(f).checkpointing();
    assert!(on(&["--finetuning_type", "lora"]));
    assert!(!on(&["--finetuning_type", "full"]));
    assert!(!on(&["--finetuning_type", "freeze"]));
    assert!(on(&[
        "--finetuning_type",
        "full",
        "--gradient_checkpointing"
    ]));
    assert!(!on(&[
        "--finetuning_type",
        "lora",
        "--gradient_checkpointing",
        "false"
    ]));
    assert!(!on(&[
        "--finetuning_type",
        "lora",
        "--disable_gradient_checkpointing"
    ]));
    assert!(!on(&[
        "--gradient_checkpointing",
        "--disable_gradient_checkpointing"
    ]));
}

/// Each fixed-choice setting, a value it does not take (one LLaMA-Factory or HF accepts,
/// where they accept more than phi-train implements) and the values phi-train names.
const CHOICES: &[(&str, &str, &str)] = &[
    ("stage", "dpo", "sft or pt"),
    ("finetuning_type", "lorra", "lora, freeze or full"),
    ("optim", "adafactor", "adamw_torch, adamw_8bit or sgd"),
    ("quantization_type", "int4", "nf4 or fp4"),
    (
        "lr_scheduler_type",
        "cosine_with_restarts",
        "constant, constant_with_warmup, linear or cosine",
    ),
    ("eval_strategy", "step", "no, steps or epoch"),
    ("norm_surgery", "layernorm", "none or rmsnorm"),
];

fn from_file(path: &std::path::Path) -> Result<TrainArgs, phi_trainer::TrainError> {
    TrainArgs::from_cli([std::ffi::OsStr::new("phi-train"), path.as_os_str()])
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("phi-trainer-args-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_value_outside_a_settings_choices_is_one_line_naming_them() {
    let dir = scratch("choices");
    for (key, bad, accepted) in CHOICES {
        let want = format!("{key} = {bad}: expected {accepted}");
        let kebab = format!("--{}", key.replace('_', "-"));
        for argv in [
            vec![format!("--{key}"), bad.to_string()],
            vec![format!("--{key}={bad}")],
            vec![kebab, bad.to_string()],
        ] {
            let argv = std::iter::once("phi-train".to_string()).chain(argv);
            let e = TrainArgs::from_cli(argv).unwrap_err().to_string();
            assert_eq!(e, want);
        }
        for (name, text) in [
            ("run.yaml", format!("{key}: {bad}\n")),
            ("run.toml", format!("{key} = \"{bad}\"\n")),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let e = from_file(&path).unwrap_err().to_string();
            assert_eq!(e, format!("{}: {want}", path.display()));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hf_optimizer_names_are_read_as_ours() {
    let dir = scratch("optim");
    let names = [
        (
            ["adamw", "adamw_hf", "adamw_torch_fused"],
            Optim::AdamwTorch,
            "adamw_torch",
        ),
        // bitsandbytes' 8-bit AdamW under HF's three names.
        (
            ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"],
            Optim::Adamw8bit,
            "adamw_8bit",
        ),
    ];
    for (hf, ours, saved) in names {
        for name in hf {
            assert_eq!(args(&["--optim", name]).optim, ours);
            let path = dir.join("run.yaml");
            std::fs::write(&path, format!("optim: {name}\n")).unwrap();
            let a = from_file(&path).unwrap();
            assert_eq!(a.optim, ours);
            assert!(a.to_toml().contains(&format!("optim = \"{saved}\"")));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_saved_config_loads_back_as_the_same_settings() {
    let dir = scratch("round-trip");
    let mut want = args(&[
        "--stage",
        "pt",
        "--finetuning_type",
        "freeze",
        "--optim",
        "sgd",
        "--lr_scheduler_type",
        "constant_with_warmup",
        "--eval_strategy",
        "epoch",
        "--norm_surgery",
        "rmsnorm",
        "--dataset",
        "a.jsonl,b.jsonl",
    ]);
    let path = dir.join("training_args.toml");
    std::fs::write(&path, want.to_toml()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for line in [
        "stage = \"pt\"",
        "finetuning_type = \"freeze\"",
        "optim = \"sgd\"",
        "lr_scheduler_type = \"constant_with_warmup\"",
        "eval_strategy = \"epoch\"",
        "norm_surgery = \"rmsnorm\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let got = from_file(&path).unwrap();
    want.config = Some(path);
    assert_eq!(got, want);
    let defaults = TrainArgs::default();
    assert_eq!(
        (defaults.stage, defaults.finetuning_type, defaults.optim),
        (Stage::Sft, FinetuningType::Lora, Optim::AdamwTorch)
    );
    assert_eq!(
        (
            defaults.lr_scheduler_type,
            defaults.eval_strategy,
            defaults.norm_surgery
        ),
        (LrSchedulerType::Linear, EvalStrategy::No, NormSurgery::None)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantization_settings_are_checked_in_one_line() {
    use phi_trainer::setup::check_args;
    let full = args(&["--quantization_bit", "4", "--finetuning_type", "full"]);
    let e = check_args(&full).unwrap_err().to_string();
    assert!(
        e.starts_with("quantization_bit = 4: expected no quantization with finetuning_type full"),
        "{e}"
    );
    let e = check_args(&args(&["--quantization_bit", "3"]))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "quantization_bit: expected 4 or 8, found 3");
    let a = args(&["--quantization_bit", "4", "--quantization_type", "fp4"]);
    assert!(check_args(&a).is_ok());
    // Per-layer checkpointing is the default for a quantized base, and not for an f32 one.
    assert!(a.layerwise());
    assert!(!args(&[]).layerwise());
    let reg = args(&["--checkpoint_layers", "--use_rmsnorm_regularization"]);
    let e = check_args(&reg).unwrap_err().to_string();
    assert!(
        e.starts_with("checkpoint_layers = true: expected false"),
        "{e}"
    );
}
