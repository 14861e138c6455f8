/* Shared pieces of the trainers (SFT, reward, policy). */
#ifndef LIBPERL_TRAIN_H
#define LIBPERL_TRAIN_H

#include "engine.h"

/* The adapter's training workspace, created on first use. */
int lora_engine(perl_lora *lora, engine **out);

#endif /* LIBPERL_TRAIN_H */
