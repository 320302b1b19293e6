//! Flag rules that are not plain parsing.

use phi_trainer::args::TrainArgs;

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
