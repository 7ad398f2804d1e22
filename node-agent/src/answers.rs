//! The answers this node gave, remembered for idempotent replay: a
//! coordinator that retries after a lost reply, or a new leader re-sending
//! its predecessor's command, gets the first answer again and nothing is
//! applied twice. Bounded: the oldest answers are forgotten first.

use std::collections::{HashMap, VecDeque};

use crate::command::{Answer, CommandKey};

/// How many answers are remembered for idempotent replay.
pub const REMEMBERED_ANSWERS: usize = 1024;

/// First answers by command key, oldest forgotten first.
#[derive(Debug)]
pub struct Answers {
    capacity: usize,
    answers: HashMap<CommandKey, Answer>,
    order: VecDeque<CommandKey>,
}

impl Default for Answers {
    fn default() -> Self {
        Self::with_capacity(REMEMBERED_ANSWERS)
    }
}

impl Answers {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity, answers: HashMap::new(), order: VecDeque::new() }
    }

    pub fn get(&self, key: &CommandKey) -> Option<Answer> {
        self.answers.get(key).cloned()
    }

    pub fn remember(&mut self, key: CommandKey, answer: Answer) {
        if self.answers.insert(key.clone(), answer).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Kind;

    fn key(n: u32) -> CommandKey {
        (format!("r{n}"), "p".into(), Kind::Commit)
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut answers = Answers::with_capacity(2);
        for n in 0..3 {
            answers.remember(key(n), Answer { ok: true, reason: format!("{n}"), processes: vec![] });
        }
        assert!(answers.get(&key(0)).is_none());
        assert_eq!(answers.get(&key(2)).map(|a| a.reason), Some("2".into()));
        // Remembering a key again does not count twice.
        answers.remember(key(2), Answer::default());
        assert!(answers.get(&key(1)).is_some());
    }
}
