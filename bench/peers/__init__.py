"""The peers photref is measured against, each in a git-ignored virtual environment of its own (made on first
use by the bench that needs it): their dependency pins cannot share photref's environment."""
