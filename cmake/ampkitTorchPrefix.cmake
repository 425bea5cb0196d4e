# Locate LibTorch through the Python interpreter's torch package when the caller
# did not point CMake at it (Torch_DIR or CMAKE_PREFIX_PATH).
if(NOT Torch_DIR)
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
