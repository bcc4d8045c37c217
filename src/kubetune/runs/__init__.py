"""A run, in one place: where everything it holds lives (`layout`), its checkpoints and the writer's
cleaning rules (`checkpoints`), the reader's view (`view`), the writer's working copy, uploads and
lease (`sync`, `lease`), and what verbs that need weights materialise (`run`). Nothing outside this
package builds a run's paths or keys (docs/design.md, "Run layout")."""
