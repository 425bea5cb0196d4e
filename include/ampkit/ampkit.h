#pragma once
/// \file ampkit.h
/// Umbrella header: everything ampkit offers C++ users.

#include <ampkit/autocast.h>
#include <ampkit/cast_policy.h>
#include <ampkit/diagnostics.h>
#include <ampkit/distributed.h>
#include <ampkit/grad_scaler.h>
#include <ampkit/low_precision.h>
#include <ampkit/optim.h>
#include <ampkit/trainer.h>
