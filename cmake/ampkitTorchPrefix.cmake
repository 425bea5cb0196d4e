# Included before find_package(Torch), by ampkit's build and by its installed package config.
#
# 1. Locate LibTorch through the Python interpreter's torch package when the caller did not point
#    CMake at it (Torch_DIR, Torch_ROOT, or CMAKE_PREFIX_PATH, as a variable or in the environment).
#    Where the caller did, Python's torch must stay out of the search: TorchConfig.cmake finds its
#    Caffe2Config.cmake through CMAKE_PREFIX_PATH before its own folder, so a second LibTorch there
#    (the interpreter's torch 2.13 beside a LibTorch 2.11 named by CMAKE_PREFIX_PATH) mixed the two.
set(_ampkit_torch_named OFF)
if(Torch_DIR)
  set(_ampkit_torch_named ON)
else()
  find_file(_ampkit_torch_config NAMES TorchConfig.cmake torch-config.cmake
    PATHS ${CMAKE_PREFIX_PATH} ENV CMAKE_PREFIX_PATH ${Torch_ROOT} ENV Torch_ROOT
    PATH_SUFFIXES share/cmake/Torch lib/cmake/Torch
    NO_DEFAULT_PATH)
  if(_ampkit_torch_config)
    set(_ampkit_torch_named ON)
  endif()
  unset(_ampkit_torch_config CACHE)
endif()
if(NOT _ampkit_torch_named)
  find_program(AMPKIT_PYTHON NAMES python3 python)
  if(Python3_EXECUTABLE)
    set(AMPKIT_PYTHON ${Python3_EXECUTABLE})
  endif()
  if(AMPKIT_PYTHON)
    execute_process(
      COMMAND ${AMPKIT_PYTHON} -c "import torch; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _ampkit_torch_prefix
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _ampkit_torch_rc
      ERROR_QUIET)
    if(_ampkit_torch_rc EQUAL 0 AND _ampkit_torch_prefix)
      list(APPEND CMAKE_PREFIX_PATH ${_ampkit_torch_prefix})
    endif()
  endif()
endif()

# 2. The CUDA toolkit a CUDA LibTorch's config looks for. Its Caffe2/public/cuda.cmake finds the
#    toolkit with the old FindCUDA module, which, unless told (CUDA_TOOLKIT_ROOT_DIR, or the
#    environment's CUDA_TOOLKIT_ROOT, CUDA_PATH or CUDA_BIN_PATH; not CUDA_HOME), takes the parent
#    of the first nvcc on PATH for the toolkit. Where that nvcc is a wrapper script (as
#    /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) it finds no headers there, and
#    find_package(Torch) stops: "Your installed Caffe2 version uses CUDA but I cannot find the CUDA
#    libraries". Name the toolkit that nvcc itself reports (its TOP, with -v --dryrun, which
#    compiles nothing), for the nvcc CMake compiles CUDA with (CMAKE_CUDA_COMPILER, $CUDACXX), else
#    $CUDA_HOME's, else the one on PATH. Without an nvcc, or with a toolkit named, nothing changes;
#    a CPU LibTorch never reads the variable.
if(NOT CUDA_TOOLKIT_ROOT_DIR AND NOT DEFINED ENV{CUDA_TOOLKIT_ROOT} AND NOT DEFINED ENV{CUDA_PATH}
   AND NOT DEFINED ENV{CUDA_BIN_PATH})
  set(_ampkit_nvcc "")
  if(CMAKE_CUDA_COMPILER)
    set(_ampkit_nvcc "${CMAKE_CUDA_COMPILER}")
  elseif(DEFINED ENV{CUDACXX})
    set(_ampkit_nvcc "$ENV{CUDACXX}")
  elseif(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(_ampkit_nvcc "$ENV{CUDA_HOME}/bin/nvcc")
  else()
    find_program(_ampkit_nvcc_on_path nvcc)
    if(_ampkit_nvcc_on_path)
      set(_ampkit_nvcc "${_ampkit_nvcc_on_path}")
    endif()
    unset(_ampkit_nvcc_on_path CACHE)
  endif()
  if(_ampkit_nvcc)
    execute_process(
      COMMAND "${_ampkit_nvcc}" -v --dryrun -c -x cu /dev/null -o /dev/null
      OUTPUT_VARIABLE _ampkit_nvcc_out
      ERROR_VARIABLE _ampkit_nvcc_out
      RESULT_VARIABLE _ampkit_nvcc_rc)
    if(_ampkit_nvcc_rc EQUAL 0 AND _ampkit_nvcc_out MATCHES "#\\$ TOP=([^\r\n]+)")
      get_filename_component(_ampkit_cuda_top "${CMAKE_MATCH_1}" REALPATH)
      if(EXISTS "${_ampkit_cuda_top}/include/cuda_runtime.h")
        set(CUDA_TOOLKIT_ROOT_DIR "${_ampkit_cuda_top}" CACHE PATH "CUDA toolkit (ampkit: the one ${_ampkit_nvcc} reports)")
      endif()
    endif()
  endif()
endif()
