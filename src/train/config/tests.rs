use super::*;

#[test]
fn every_key_is_documented_and_settable() {
    let defaults = toml::Table::try_from(RunConfig::default()).unwrap();
    let mut n = 0;
    for (section, fields) in &defaults {
        for field in fields.as_table().unwrap().keys() {
            let key = format!("{section}.{field}");
            assert!(
                KEYS.iter().any(|(k, _)| *k == key),
                "{key} lacks a doc line"
            );
            n += 1;
        }
    }
    assert_eq!(n, KEYS.len());
    let mut c = RunConfig::default();
    c.set("train.steps=12").unwrap();
    c.set("model.drop_tokens=false").unwrap();
    c.set("model.capacity_factor=2").unwrap();
    let mut long = RunConfig::default();
    long.set("train.sample_tokens=100000000").unwrap();
    assert!(
        long.validate()
            .unwrap_err()
            .to_string()
            .contains("train.sample_tokens must be at most")
    );
    c.set("train.sample_prompt=ROMEO:").unwrap();
    assert_eq!(c.train.steps, 12);
    assert!(!c.model.drop_tokens);
    assert_eq!(c.model.capacity_factor, 2.0);
    assert_eq!(c.train.sample_prompt, "ROMEO:");
    assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
    assert!(keys_help().contains("train.warmup"));
}

#[test]
fn bad_overrides_and_files_are_errors() {
    let mut c = RunConfig::default();
    let e = c.set("train.stepz=3").unwrap_err().to_string();
    assert!(e.contains("unknown config key `train.stepz`"), "{e}");
    let e = c.set("train.steps=many").unwrap_err().to_string();
    assert!(e.contains("train.steps"), "{e}");
    assert!(c.set("steps").is_err());
    let e = format!(
        "{:#}",
        RunConfig::from_toml("[train]\nbogus = 1\n").unwrap_err()
    );
    assert!(e.contains("bogus"), "{e}");
    c.set("train.lr=-1.0").unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("train.lr"));
}

/// A run written by a build from before a key existed resumes: its config.toml lacks only
/// keys of `KEYS_SINCE_V1`, which take the defaults that run ran with.
#[test]
fn a_run_written_before_the_newer_keys_still_reads() {
    let text = RunConfig::default().to_toml();
    let mut table: toml::Table = toml::from_str(&text).unwrap();
    for key in KEYS_SINCE_V1 {
        let (section, field) = key.split_once('.').unwrap();
        let removed = table[section].as_table_mut().unwrap().remove(field);
        assert!(removed.is_some(), "{key} is not a key");
    }
    let old = toml::to_string(&table).unwrap();
    assert!(missing_keys(&old).unwrap().is_empty());
    assert_eq!(RunConfig::from_toml(&old).unwrap(), RunConfig::default());
    // Any other key missing is an error's matter.
    table["train"].as_table_mut().unwrap().remove("batch_size");
    let cut = toml::to_string(&table).unwrap();
    assert_eq!(missing_keys(&cut).unwrap(), ["train.batch_size"]);
}
