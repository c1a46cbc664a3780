"""Workarounds that let `fit` run under `MultiWorkerMirroredStrategy`.

Keras 3.15's TensorFlow trainer does not run under a multi-worker strategy
(keras-team/keras#20585) for two reasons, both in how it reduces values
across workers, not in the training math:

1. Before the first step it reduces the first *input batch* across
   replicas with `strategy.reduce` on a nested structure, which the
   collective ops reject. The batch is only used for its shapes, so the
   first local replica's batch serves as well.
2. It reduces each step's (scalar) metric results with
   `strategy.reduce("MEAN", v, axis=0)`, which needs a batch axis. Giving
   scalars a length-1 axis makes that the mean over replicas.

`QLoRAModel` applies both when the strategy spans several workers; under
any other strategy nothing changes.
"""

import tensorflow as tf

from keras_qlora import internals


def is_multi_worker(strategy) -> bool:
    """Whether `strategy` is a collective strategy over several workers."""
    return internals.num_workers(strategy) > 1


def first_local_batch(iterator, strategy):
    """The first replica's part of the iterator's next batch (shapes only).

    `iterator` is Keras' epoch iterator, as passed to
    `before_symbolic_build`.
    """
    for _, _, data_iterator in iterator:
        batch = next(data_iterator)
        return tf.nest.map_structure(
            lambda v: (
                strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            ),
            batch,
        )
    return None


def with_replica_axis(outputs):
    """Scalars of a step's result dict as length-1 vectors."""
    return tf.nest.map_structure(
        lambda t: tf.reshape(t, [1]) if t.shape.rank == 0 else t, outputs
    )
